// Stand-in for the CUDA toolkit header of the same name: the emulation provides everything.
#pragma once
#include "emu_shim.h"
