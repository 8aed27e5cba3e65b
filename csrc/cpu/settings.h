// The CPU kernels' settings from the environment (docs/cpp.md): NLLFUSED_CPU_CAPABILITY,
// NLLFUSED_CPU_CHUNK, NLLFUSED_CPU_CACHE_MB, NLLFUSED_HUGE_PAGES, NLLFUSED_CPU_LEAN_EXP.
//
// Read while the GIL is held -- when nllfused loads the extension, and by
// nllfused._C.reload_cpu_env() -- and never by a kernel: the kernels run without the GIL (the
// one-call path releases it, as torch's op bindings do), and getenv beside another thread's
// setenv (Python's os.environ writes) can crash.
#pragma once

#include <string>

namespace nllfused_cpu {

enum class Setting { kCapability, kChunk, kCacheMb, kHugePages, kLeanExp };

// The variable's value at the last reload ("" where unset).
std::string setting(Setting which);

// Reads the variables again.
void reload_settings();

}  // namespace nllfused_cpu
