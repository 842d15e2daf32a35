// Runtime settings turned into template parameters, in one place.
//
// The packing and quantization loops are templates on the bit width so the
// compiler sees constant shifts and masks (the unpack of a 2-bit row becomes a
// handful of shifts per word instead of a variable-distance shift per code).
// Callers hold `bits` as a runtime int; these macros are the only place that
// turns it into a constant, FlashInfer style:
//
//   MESWITCH_DISPATCH_BITS(bits, BITS, { pack_row<BITS>(codes, cols, words); });
//
// An unsupported value throws meswitch::Error; callers that know the tensor name
// validate first (validate_spec) so users see the name, and this is the last guard.
#pragma once

#include <string>

#include "meswitch/error.hpp"

#define MESWITCH_DISPATCH_BITS(bits, BITS, ...)                                                        \
  [&]() {                                                                                              \
    switch (bits) {                                                                                    \
      case 1: {                                                                                        \
        constexpr int BITS = 1;                                                                        \
        __VA_ARGS__                                                                                    \
        break;                                                                                         \
      }                                                                                                \
      case 2: {                                                                                        \
        constexpr int BITS = 2;                                                                        \
        __VA_ARGS__                                                                                    \
        break;                                                                                         \
      }                                                                                                \
      case 3: {                                                                                        \
        constexpr int BITS = 3;                                                                        \
        __VA_ARGS__                                                                                    \
        break;                                                                                         \
      }                                                                                                \
      case 4: {                                                                                        \
        constexpr int BITS = 4;                                                                        \
        __VA_ARGS__                                                                                    \
        break;                                                                                         \
      }                                                                                                \
      default:                                                                                         \
        throw ::meswitch::Error("unsupported bit width " + std::to_string(bits) + " (expected 1..4)"); \
    }                                                                                                  \
  }()
