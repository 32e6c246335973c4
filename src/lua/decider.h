/* The decision core's binding for transports written in Lua; part of sturdy.policy. */
#ifndef STURDY_DECIDER_H
#define STURDY_DECIDER_H

#include <lua.h>

/* Registers the decider and call types and sets policy.decider in the table on top. */
void sl_open_decider(lua_State *L);

#endif
