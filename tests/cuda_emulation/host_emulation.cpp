// The host emulation's runtime (host_shim.h): blocks run in order, the threads of a block as fibers that switch
// at barriers; and the schemas of the emulation's operator namespace.
#include "host_shim.h"
#include "op_schemas.h"

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <array>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// ------------------------------------------------------------------------------------------ context switch
// A fiber is a stack and its saved stack pointer. On x86-64 a switch saves the callee-saved registers and the
// SSE / x87 control words on the old stack and restores them from the new one (~10 ns; ucontext's swapcontext
// also saves the signal mask with a system call, ~250 ns, and a test switches millions of times).
#if defined(__x86_64__)
extern "C" void fused_losses_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl fused_losses_emulation_switch
  .type fused_losses_emulation_switch, @function
fused_losses_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fused_losses_emulation_switch, .-fused_losses_emulation_switch
)");
#endif

namespace fused_losses::host_emulation {
namespace {

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { fused_losses_emulation_switch(&from.sp, to.sp); }

// A stack whose first switch "returns" into entry, with the caller's control words and zeroed registers.
void start_context(Context& context, char* stack, size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15));
  // entry starts as if called: its return-address slot is 16-byte aligned + 8 (a dummy one above it).
  uint64_t* sp = top - 2;
  sp[0] = reinterpret_cast<uint64_t>(entry);
  sp -= 6;  // r15, r14, r13, r12, rbx, rbp
  std::fill(sp, sp + 6, uint64_t(0));
  sp -= 1;
  uint32_t control_words[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control_words[0]), "=m"(control_words[1]));
  std::memcpy(sp, control_words, sizeof(control_words));
  context.sp = sp;
}
#else
struct Context {
  ucontext_t context;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

void start_context(Context& context, char* stack, size_t size, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = size;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}
#endif

constexpr size_t kStackBytes = size_t(256) << 10;
constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;
constexpr unsigned int kFullMask = 0xffffffffu;

// Threads arrive at a barrier; the last of `expected` releases the others. Every arrival of one generation must
// be at the same kind of barrier (label), or the threads are not executing the same barrier.
struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
  const char* label = nullptr;
};

struct Fiber {
  Context context;
  ThreadPosition position;
  const char* waiting_at = nullptr;
  bool finished = false;
};

struct alignas(16) SharedChunk {
  unsigned char bytes[16];
};

struct BlockRun {
  std::vector<Fiber> fibers;
  Context scheduler;
  int current = -1;
  int threads = 0;
  const std::function<void()>* body = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::array<unsigned char, 16>> exchange;  // each thread's published bytes
  std::vector<SharedChunk> dynamic_shared;               // the launch's dynamic shared memory, block by block
  uint64_t events = 0;  // arrivals and exits: a scheduler round without one is a deadlock
  std::string error;
};

thread_local BlockRun* active_run = nullptr;

// Fiber stacks with an inaccessible page below each, so that an overflow faults instead of corrupting memory.
char* fiber_stack(int index) {
  thread_local std::vector<char*> stacks;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(stacks.size()) <= index) {
    void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(memory != MAP_FAILED, "host emulation: cannot map a fiber stack");
    TORCH_CHECK(mprotect(memory, page, PROT_NONE) == 0, "host emulation: cannot protect a stack guard page");
    stacks.push_back(static_cast<char*>(memory) + page);
  }
  return stacks[index];
}

Fiber& self() { return active_run->fibers[active_run->current]; }

int linear_thread() { return static_cast<int>(self().position.thread_idx.x); }

void yield_to_scheduler() { switch_context(self().context, active_run->scheduler); }

// Records the error and parks the fiber for good; the scheduler throws after its round.
[[noreturn]] void fail(const std::string& message) {
  if (active_run->error.empty()) active_run->error = message;
  for (;;) yield_to_scheduler();
}

void arrive_and_wait(Barrier& barrier, int expected, const char* label) {
  BlockRun& run = *active_run;
  ++run.events;
  if (barrier.arrived == 0) {
    barrier.label = label;
  } else if (barrier.label != label) {
    std::ostringstream message;
    message << "thread " << linear_thread() << " reaches " << label << " while others of its group wait at "
            << barrier.label;
    fail(message.str());
  }
  if (++barrier.arrived == expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  const uint64_t generation = barrier.generation;
  self().waiting_at = label;
  while (barrier.generation == generation) yield_to_scheduler();
  self().waiting_at = nullptr;
}

constexpr const char* kSyncThreads = "__syncthreads";
constexpr const char* kSyncWarp = "__syncwarp";
constexpr const char* kWarpCollective = "a warp shuffle or vote";

int warp_threads(int warp) { return std::min(kWarpSize, active_run->threads - warp * kWarpSize); }

void check_full_mask(unsigned int mask) {
  if (mask != kFullMask) fail("host emulation: only full-warp masks (0xffffffff) are emulated");
}

void warp_barrier(const char* label) {
  const int warp = linear_thread() / kWarpSize;
  arrive_and_wait(active_run->warp_barriers[warp], warp_threads(warp), label);
}

// A fiber's first frame: runs the kernel, then hands control back for good (a finished fiber is not resumed).
void fiber_main() {
  try {
    (*active_run->body)();
  } catch (const std::exception& e) {
    fail(std::string("exception in a kernel thread: ") + e.what());
  }
  self().finished = true;
  ++active_run->events;
  yield_to_scheduler();
  std::abort();
}

std::string deadlock_message(const BlockRun& run, int64_t block) {
  std::map<std::string, int> waiting;
  int finished = 0;
  for (const Fiber& fiber : run.fibers) {
    if (fiber.finished) {
      ++finished;
    } else {
      ++waiting[fiber.waiting_at != nullptr ? fiber.waiting_at : "?"];
    }
  }
  std::ostringstream message;
  message << "host emulation: block " << block << " cannot go on (a barrier that not every thread reaches):";
  for (const auto& [label, count] : waiting) message << " " << count << " threads wait at " << label << ";";
  message << " " << finished << " threads have returned";
  return message.str();
}

void run_block(BlockRun& run, int64_t block, int64_t blocks) {
  run.current = -1;
  run.block_barrier = Barrier{};
  std::fill(run.warp_barriers.begin(), run.warp_barriers.end(), Barrier{});
  run.events = 0;
  // Shared memory starts undefined on the GPU: all-ones bytes (a NaN as a float) make a read before a write show.
  std::memset(run.dynamic_shared.data(), 0xff, run.dynamic_shared.size() * sizeof(SharedChunk));
  for (int t = 0; t < run.threads; ++t) {
    Fiber& fiber = run.fibers[t];
    fiber.finished = false;
    fiber.waiting_at = nullptr;
    fiber.position.thread_idx = {static_cast<unsigned int>(t), 0, 0};
    fiber.position.block_idx = {static_cast<unsigned int>(block), 0, 0};
    fiber.position.block_dim = {static_cast<unsigned int>(run.threads), 1, 1};
    fiber.position.grid_dim = {static_cast<unsigned int>(blocks), 1, 1};
    start_context(fiber.context, fiber_stack(t), kStackBytes, fiber_main);
  }
  for (;;) {
    const uint64_t events_before = run.events;
    bool all_finished = true;
    for (int t = 0; t < run.threads; ++t) {
      if (run.fibers[t].finished) continue;
      run.current = t;
      switch_context(run.scheduler, run.fibers[t].context);
      all_finished &= run.fibers[t].finished;
    }
    if (!run.error.empty()) throw std::runtime_error("host emulation: block " + std::to_string(block) + ": " + run.error);
    if (all_finished) return;
    if (run.events == events_before) throw std::runtime_error(deadlock_message(run, block));
  }
}

}  // namespace

const ThreadPosition& current_position() {
  TORCH_CHECK(active_run != nullptr && active_run->current >= 0, "host emulation: a CUDA built-in outside a kernel");
  return self().position;
}

void run_grid(int64_t blocks, int threads, const std::function<void()>& body, size_t dynamic_shared_bytes) {
  TORCH_CHECK(active_run == nullptr, "host emulation: a launch from inside a kernel");
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), "host emulation: bad grid size ", blocks);
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads, "host emulation: bad block size ", threads);
  BlockRun run;
  run.threads = threads;
  run.body = &body;
  run.fibers.resize(threads);
  run.warp_barriers.resize((threads + kWarpSize - 1) / kWarpSize);
  run.exchange.resize(threads);
  run.dynamic_shared.resize((dynamic_shared_bytes + sizeof(SharedChunk) - 1) / sizeof(SharedChunk));
  active_run = &run;
  try {
    for (int64_t block = 0; block < blocks; ++block) run_block(run, block, blocks);
  } catch (...) {
    active_run = nullptr;
    throw;
  }
  active_run = nullptr;
}

void* dynamic_shared_memory() {
  TORCH_CHECK(!active_run->dynamic_shared.empty(), "host emulation: dynamic shared memory of a launch without any");
  return active_run->dynamic_shared.data();
}

void sync_block() { arrive_and_wait(active_run->block_barrier, active_run->threads, kSyncThreads); }

void sync_warp(unsigned int mask) {
  check_full_mask(mask);
  warp_barrier(kSyncWarp);
}

void publish_to_warp(unsigned int mask, const void* bytes, size_t size) {
  check_full_mask(mask);
  std::memcpy(active_run->exchange[linear_thread()].data(), bytes, size);
  warp_barrier(kWarpCollective);
}

const void* lane_value(int lane) {
  const int warp = linear_thread() / kWarpSize;
  return active_run->exchange[warp * kWarpSize + lane].data();
}

void end_warp_exchange(unsigned int mask) {
  check_full_mask(mask);
  warp_barrier(kWarpCollective);
}

}  // namespace fused_losses::host_emulation

FUSED_LOSSES_EMULATED_LIBRARY(FUSED_LOSSES_EMULATED_NAMESPACE, m) { fused_losses::define_operator_schemas(m); }
