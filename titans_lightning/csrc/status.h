// The one convention of the kernels' C interface: every exported function returns a status,
// kOk when it did its work; anything else means it wrote nothing the caller may use, and the
// Python side (titans_lightning/kernels/cpu.py) raises. Sizes outside a kernel's limits are
// refused here as well as in Python, so a caller that skips the Python check cannot make a
// kernel read or write past its buffers.
#pragma once

#include <new>

namespace {

constexpr int kOk = 0;
constexpr int kOutOfMemory = 1;
constexpr int kUnsupportedSize = 2;

// body() -> status, with an allocation failure turned into kOutOfMemory: a C++ exception must
// not cross the C interface.
template <typename Body>
int guarded(Body&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return kOutOfMemory;
  }
}

}  // namespace
