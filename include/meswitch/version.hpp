#pragma once

namespace meswitch {
constexpr const char* kVersion = "0.1.0";
}  // namespace meswitch
