/* csrc/linux.c (the agent's C wrappers) for the built-in module _agent_linux: see agent_linux_prelude.h. */
#include "agent_linux_prelude.h"
#include "linux.c"
