// The environment settings of the CPU kernels, read once per reload (csrc/cpu/settings.h).
#include "settings.h"

#include <array>
#include <cstdlib>
#include <mutex>

namespace nllfused_cpu {
namespace {

constexpr std::array<const char*, 5> kNames = {"NLLFUSED_CPU_CAPABILITY", "NLLFUSED_CPU_CHUNK",
                                               "NLLFUSED_CPU_CACHE_MB", "NLLFUSED_HUGE_PAGES",
                                               "NLLFUSED_CPU_LEAN_EXP"};
using Values = std::array<std::string, kNames.size()>;

Values read_environment() {
  Values v;
  for (size_t i = 0; i < kNames.size(); ++i) {
    const char* s = std::getenv(kNames[i]);
    v[i] = s == nullptr ? "" : s;
  }
  return v;
}

std::mutex& values_mutex() {
  static std::mutex m;
  return m;
}

// (first read when the extension loads: nllfused/_extension.py reloads at import)
Values& values() {
  static Values v = read_environment();
  return v;
}

}  // namespace

std::string setting(Setting which) {
  std::lock_guard<std::mutex> lock(values_mutex());
  return values()[static_cast<size_t>(which)];
}

void reload_settings() {
  Values v = read_environment();
  std::lock_guard<std::mutex> lock(values_mutex());
  values() = std::move(v);
}

}  // namespace nllfused_cpu
