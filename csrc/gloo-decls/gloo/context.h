// distill: declarations only (see ../../README.md)
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  // called by inline code in ProcessGroupGloo.hpp (setTimeout), never by the shim
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
