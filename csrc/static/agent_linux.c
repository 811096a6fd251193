/* The agent's cffi module agent._linux (csrc/generated/_linux.c, emitted by `python build.py gen` from
 * csrc/linux_cdef.h: the same file that pip's build compiles) as the built-in module _agent_linux of
 * nodeagent's static CPython (build.py static, stage "python"). Built-in modules cannot have dotted names:
 * only the init function is renamed; the module still calls itself "agent._linux", and agent/linux.py falls
 * back to importing _agent_linux when agent._linux is not there. */
#include "agent_linux_prelude.h"
#define PyInit__linux PyInit__agent_linux
#include "_linux.c"
