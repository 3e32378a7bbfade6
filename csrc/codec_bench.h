// Registers the codec benchmark timer (csrc/codec_bench.cpp) on a pybind11 submodule.
#pragma once

#include <pybind11/pybind11.h>

void register_bench(pybind11::module_ m);
