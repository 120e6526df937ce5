/* flashlua: the host. Embeds LuaJIT, preloads flash.core and hands argv to the Lua CLI
 * (flash.cli, compiled into this binary as bytecode). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_flash_core(lua_State *L);

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = "(error object is not a string)";
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  lua_pushstring(L, msg);
  lua_pushinteger(L, 2);
  lua_call(L, 2, 1);
  return 1;
}

static int run(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_flash_core);
  lua_setfield(L, -2, "flash.core");
  lua_pop(L, 2);
  lua_getglobal(L, "require");
  lua_pushstring(L, "flash.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  struct stat st;
  /* C's stdio buffers a pipe fully, so `flashlua s.lua | cat` would show a script's print
   * and io.write only at exit: anything but a regular file gets one write per line. */
  if (fstat(STDOUT_FILENO, &st) != 0 || !S_ISREG(st.st_mode)) setvbuf(stdout, NULL, _IOLBF, BUFSIZ);
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "flashlua: cannot create the Lua state (out of memory)\n");
    return 1;
  }
  lua_pushcfunction(L, traceback);
  lua_pushcfunction(L, run);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status;
  if (lua_pcall(L, 2, 1, 1) != 0) {
    fprintf(stderr, "flashlua: %s\n", lua_tostring(L, -1));
    status = 1;
  } else {
    status = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  }
  lua_close(L);
  return status;
}
