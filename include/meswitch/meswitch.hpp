// Everything public, for C++ engines that want one include.
#pragma once

#include "meswitch/artifact.hpp"
#include "meswitch/delta.hpp"
#include "meswitch/dispatch.hpp"
#include "meswitch/dlpack.hpp"
#include "meswitch/error.hpp"
#include "meswitch/half.hpp"
#include "meswitch/mapped_file.hpp"
#include "meswitch/pack.hpp"
#include "meswitch/quantize.hpp"
#include "meswitch/safetensors.hpp"
#include "meswitch/salient.hpp"
#include "meswitch/sha256.hpp"
#include "meswitch/sharded_safetensors.hpp"
#include "meswitch/tensor.hpp"
#include "meswitch/version.hpp"
