/* Lua 5.1 / LuaJIT compatibility: the few 5.2+ API pieces the binding uses. */
#ifndef STURDY_COMPAT_H
#define STURDY_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM < 502

#define lua_rawlen(L, i) lua_objlen((L), (i))

#define lua_absindex(L, i) \
    (((i) > 0 || (i) <= LUA_REGISTRYINDEX) ? (i) : lua_gettop(L) + (i) + 1)

/* a userdata's environment table plays the 5.2 user value (always a table here) */
#define lua_setuservalue(L, i) lua_setfenv((L), (i))
#define lua_getuservalue(L, i) lua_getfenv((L), (i))

/* LuaJIT 2.1 already has these (its lauxlib.h defines luaL_newlib) */
#ifndef luaL_newlib

static inline void luaL_setfuncs(lua_State *L, const luaL_Reg *l, int nup)
{
    luaL_checkstack(L, nup, "too many upvalues");
    for (; l->name != NULL; l++) {
        int i;
        for (i = 0; i < nup; i++)
            lua_pushvalue(L, -nup);
        lua_pushcclosure(L, l->func, nup);
        lua_setfield(L, -(nup + 2), l->name);
    }
    lua_pop(L, nup);
}

#define luaL_newlib(L, l) (lua_newtable(L), luaL_setfuncs((L), (l), 0))

static inline void luaL_setmetatable(lua_State *L, const char *tname)
{
    luaL_getmetatable(L, tname);
    lua_setmetatable(L, -2);
}

static inline void *luaL_testudata(lua_State *L, int i, const char *tname)
{
    void *p = lua_touserdata(L, i);
    if (p == NULL || !lua_getmetatable(L, i))
        return NULL;
    luaL_getmetatable(L, tname);
    if (!lua_rawequal(L, -1, -2))
        p = NULL;
    lua_pop(L, 2);
    return p;
}
#endif

#endif

#if LUA_VERSION_NUM < 503
/* Integers beyond 2^53 are not needed: counts and milliseconds fit a double. */
#define lua_isinteger(L, i) 0
#endif

/* The one symbol a Lua C module exports; the rest stays hidden when built
 * with -fvisibility=hidden. */
#if defined(__GNUC__)
#define ST_EXPORT __attribute__((visibility("default")))
#else
#define ST_EXPORT
#endif

#endif
