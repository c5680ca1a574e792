// distill's bridge to PyTorch's distributed runtime (c10d), compiled by build.rs against the headers
// of the libtorch that torch-sys links: a TCPStore rendezvous, a ProcessGroupGloo (CPU tensors) or a
// ProcessGroupNCCL (CUDA tensors; compiled only when DISTILL_NCCL is defined, i.e. libtorch has
// CUDA and the NCCL and CUDA headers were found), and the collectives data parallelism needs:
// all-reduce, broadcast, barrier. Every call waits for its work to finish (with the group's
// timeout) and turns any C++ exception into a message the Rust side makes an error of; nothing
// here aborts the process.
//
// The Rust side passes tensors as tch's C_tensor pointers, i.e. `at::Tensor*` (torch-sys's
// torch_api.h: `typedef torch::Tensor *tensor;`).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DISTILL_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

char* copy_message(const std::string& s) {
  char* m = static_cast<char*>(std::malloc(s.size() + 1));
  if (m != nullptr) {
    std::memcpy(m, s.c_str(), s.size() + 1);
  }
  return m;
}

// Runs `f`; on an exception stores its message in *err and returns false.
template <typename F>
bool guarded(char** err, F f) {
  try {
    f();
    return true;
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception in c10d");
  }
  return false;
}

std::vector<at::Tensor> tensors_of(void** ptrs, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; i++) {
    v.push_back(*static_cast<at::Tensor*>(ptrs[i]));
  }
  return v;
}

c10d::ReduceOp op_of(int op) {
  switch (op) {
    case 1:
      return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 2:
      return c10d::ReduceOp(c10d::ReduceOp::MIN);
    default:
      return c10d::ReduceOp(c10d::ReduceOp::SUM);
  }
}

} // namespace

extern "C" {

// Whether this build has ProcessGroupNCCL.
int distill_c10d_has_nccl() {
#ifdef DISTILL_NCCL
  return 1;
#else
  return 0;
#endif
}

// The rendezvous and the process group. `agent_store`: the TCPStore server is hosted by someone
// else (torchrun's agent, TORCHELASTIC_USE_AGENT_STORE=True), so every rank is a client; otherwise
// rank 0 hosts it. `prefix` (may be empty) namespaces the keys. `nccl`: a ProcessGroupNCCL for CUDA
// tensors instead of Gloo. Returns NULL with *err set on failure.
void* distill_c10d_new(
    const char* host,
    int port,
    int rank,
    int world,
    long long timeout_ms,
    int agent_store,
    const char* prefix,
    int nccl,
    char** err) {
  Group* g = nullptr;
  bool ok = guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = agent_store == 0 && rank == 0;
    o.numWorkers = static_cast<std::size_t>(world);
    o.waitWorkers = agent_store == 0;
    o.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    if (prefix != nullptr && prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    }
    auto group = std::make_unique<Group>();
    group->store = store;
    if (nccl != 0) {
#ifdef DISTILL_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      group->backend =
          c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error(
          "this distill was built without NCCL (libtorch without CUDA, or the NCCL/CUDA headers were not found at build time)");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      group->backend =
          c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    }
    g = group.release();
  });
  return ok ? g : nullptr;
}

void distill_c10d_free(void* group) {
  delete static_cast<Group*>(group);
}

void distill_c10d_free_message(char* m) {
  std::free(m);
}

// One all-reduce per tensor, in place, all started before the first is waited for (the group's
// worker threads run them concurrently). op: 0 sum, 1 max, 2 min.
int distill_c10d_all_reduce(void* group, void** tensors, int n, int op, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] {
           std::vector<std::vector<at::Tensor>> each;
           each.reserve(n);
           for (auto& t : tensors_of(tensors, n)) {
             each.push_back({t});
           }
           c10d::AllreduceOptions o;
           o.reduceOp = op_of(op);
           std::vector<c10::intrusive_ptr<c10d::Work>> works;
           works.reserve(n);
           for (auto& v : each) {
             works.push_back(g->backend->allreduce(v, o));
           }
           for (auto& w : works) {
             w->wait();
           }
         })
      ? 0
      : -1;
}

// Each tensor replaced by root's, in place.
int distill_c10d_broadcast(void* group, void** tensors, int n, int root, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] {
           std::vector<std::vector<at::Tensor>> each;
           each.reserve(n);
           for (auto& t : tensors_of(tensors, n)) {
             each.push_back({t});
           }
           c10d::BroadcastOptions o;
           o.rootRank = root;
           std::vector<c10::intrusive_ptr<c10d::Work>> works;
           works.reserve(n);
           for (auto& v : each) {
             works.push_back(g->backend->broadcast(v, o));
           }
           for (auto& w : works) {
             w->wait();
           }
         })
      ? 0
      : -1;
}

int distill_c10d_barrier(void* group, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] { g->backend->barrier()->wait(); }) ? 0 : -1;
}

} // extern "C"
