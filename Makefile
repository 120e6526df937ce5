# flashlua — build the host (flashlua), the module (flash/core.so + lua/flash/*.lua), tests.
PREFIX   ?= /usr/local
LUA_VER  := 5.1
LUADIR   ?= $(PREFIX)/share/lua/$(LUA_VER)
CMODDIR  ?= $(PREFIX)/lib/lua/$(LUA_VER)
BINDIR   ?= $(PREFIX)/bin

LUAJIT_CFLAGS := $(shell pkg-config --cflags luajit)
LUAJIT_LIBS   := $(shell pkg-config --libs luajit)
PQ_CFLAGS     := $(shell pkg-config --cflags libpq 2>/dev/null || echo -I/usr/include/postgresql)
PQ_LIBS       := $(shell pkg-config --libs libpq 2>/dev/null || echo -lpq)
LUAJIT        ?= luajit

CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu99 -Wall -Wextra -fPIC $(LUAJIT_CFLAGS) $(PQ_CFLAGS)
LDFLAGS ?=

B := build
# Pure C: no Lua, no libpq.
# Until the pgoutput decoder lands, the replication binding is left out (temporary).
HAVE_REPL := $(wildcard src/fl_pgoutput.c)
PURE_SRC := src/fl_json.c src/fl_value.c $(HAVE_REPL)
# Lua binding: the only files that touch lua_State.
BIND_SRC := src/lvalue.c src/lconn.c $(if $(HAVE_REPL),src/lrepl.c) src/lcore.c
CFLAGS   += $(if $(HAVE_REPL),-DFL_HAVE_REPL)
CORE_OBJ := $(patsubst src/%.c,$(B)/%.o,$(PURE_SRC) $(BIND_SRC))
LUA_SRC  := $(wildcard lua/flash/*.lua)
# Embedded bytecode for the host: lua/flash/init.lua -> module "flash", x.lua -> "flash.x".
LUA_BC   := $(patsubst lua/flash/%.lua,$(B)/bc/%.o,$(LUA_SRC))

.PHONY: all test test-c demo bench install clean check-mem fuzz deps

all: $(B)/flashlua $(B)/flash/core.so $(B)/test_c

$(B)/%.o: src/%.c src/*.h | $(B)
	$(CC) $(CFLAGS) -c -o $@ $<

$(B)/bc/init.o: lua/flash/init.lua | $(B)/bc
	$(LUAJIT) -b -n flash $< $@
$(B)/bc/%.o: lua/flash/%.lua | $(B)/bc
	$(LUAJIT) -b -n flash.$* $< $@

# The module: never links libluajit (symbols come from the host process).
$(B)/flash/core.so: $(CORE_OBJ) | $(B)/flash
	$(CC) -shared -o $@ $(CORE_OBJ) $(LDFLAGS) $(PQ_LIBS)

# The host: LuaJIT embedded, -Wl,-E so C rocks a script loads resolve lua_* from us
# and LuaJIT's loader finds the embedded luaJIT_BC_* modules.
$(B)/flashlua: $(B)/main.o $(CORE_OBJ) $(LUA_BC)
	$(CC) -o $@ $^ -Wl,-E $(LDFLAGS) $(LUAJIT_LIBS) $(PQ_LIBS) -lm -ldl

# C unit tests of the pure parts, on byte fixtures, no server.
$(B)/test_c: test/test_c.c $(patsubst src/%.c,$(B)/%.o,$(PURE_SRC))
	$(CC) $(CFLAGS) -Isrc -o $@ $^ -lm

$(B) $(B)/bc $(B)/flash:
	mkdir -p $@

# Both README commands install what is missing first (a fresh Debian machine), then
# re-enter make so the pkg-config flags are read after the install.
deps:
	scripts/deps

test:
	scripts/deps
	$(MAKE) all
	scripts/run-tests

test-c: $(B)/test_c
	$(B)/test_c

demo:
	scripts/deps
	$(MAKE) all
	$(B)/flashlua --sandbox examples/demo.lua

# Benchmarks on a throwaway cluster (not timed tests): see README "Performance".
bench:
	scripts/deps
	$(MAKE) all
	LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="$(B)/?.so;;" $(LUAJIT) bench/wal.lua

# The pure C parsers under ASan/UBSan and valgrind.
SAN := -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
check-mem: | $(B)
	$(CC) -std=gnu99 -Wall -Wextra $(SAN) -Isrc -o $(B)/test_c_san test/test_c.c $(PURE_SRC) -lm
	$(B)/test_c_san
	$(MAKE) $(B)/test_c
	valgrind -q --error-exitcode=1 --leak-check=full $(B)/test_c

# libFuzzer on the JSON/array/bytea/int parsers (needs clang); FUZZ_SECONDS=60 by default.
FUZZ_SECONDS ?= 60
fuzz: | $(B)
	clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc -o $(B)/fuzz_json test/fuzz_json.c $(PURE_SRC)
	$(B)/fuzz_json -max_total_time=$(FUZZ_SECONDS) -max_len=4096

install: $(B)/flashlua $(B)/flash/core.so
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LUADIR)/flash $(DESTDIR)$(CMODDIR)/flash
	install -m 755 $(B)/flashlua $(DESTDIR)$(BINDIR)/flashlua
	install -m 644 $(B)/flash/core.so $(DESTDIR)$(CMODDIR)/flash/core.so
	install -m 644 $(LUA_SRC) $(DESTDIR)$(LUADIR)/flash/

clean:
	rm -rf $(B)
