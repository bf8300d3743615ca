// The lockstep warp of runtime.h, as 32 coroutines (ucontext) on the calling thread: each lane runs
// until it reaches a shuffle (or ends), and once every lane has, they all go on. A shuffle is two
// such barriers: every lane posts its value, then reads its partner's. Coroutines instead of
// threads because a warp synchronises at every shuffle: 32 threads on a 2-core machine spend
// their time in the scheduler.
#include <ucontext.h>

#include "runtime.h"

namespace msda_emulator {

dim3 thread_index;
dim3 block_index;
dim3 block_dim;
dim3 grid_dim;

namespace {

constexpr int kLanes = 32;
// Small stacks: AddressSanitizer clears a coroutine stack's shadow at every switch, so its cost
// grows with the size. The kernels' frames need a few KB (more in sanitizer builds).
constexpr std::size_t kStackBytes = std::size_t(64) << 10;

class Warp {
 public:
  Warp() {
    for (auto& stack : stacks_) stack.resize(kStackBytes);
  }

  // Runs body() on all 32 lanes of warp `w` of block `b` and returns when every lane is done.
  void run(const std::function<void()>& body, std::int64_t b, int w) {
    body_ = &body;
    block_ = b;
    warp_ = w;
    for (int lane = 0; lane < kLanes; ++lane) {
      getcontext(&lanes_[lane]);
      lanes_[lane].uc_stack.ss_sp = stacks_[lane].data();
      lanes_[lane].uc_stack.ss_size = stacks_[lane].size();
      lanes_[lane].uc_link = &scheduler_;
      makecontext(&lanes_[lane], &Warp::entry, 0);
      state_[lane] = State::running;
      shuffles_[lane] = 0;
    }
    for (;;) {
      // One round: every running lane goes on to its next barrier, or to its end.
      for (int lane = 0; lane < kLanes; ++lane) {
        if (state_[lane] != State::running) continue;
        current_ = lane;
        block_index = {static_cast<unsigned>(block_), 0, 0};
        thread_index = {static_cast<unsigned>(warp_ * kLanes + lane), 0, 0};
        swapcontext(&scheduler_, &lanes_[lane]);
      }
      int waiting = 0;
      for (State s : state_) waiting += s == State::at_barrier;
      if (waiting == 0) return;
      if (waiting != kLanes) ++faults;  // some lanes ended while others wait at a shuffle
      for (State& s : state_)
        if (s == State::at_barrier) s = State::running;
    }
  }

  std::uint64_t exchange(std::uint64_t bits, int offset) { return read_lane(bits, current_ ^ offset); }

  // Every lane posts `bits` and reads what lane `partner` posted.
  std::uint64_t read_lane(std::uint64_t bits, int partner) {
    const int lane = current_;
    slots_[lane] = bits;
    sequence_[lane] = ++shuffles_[lane];
    wait();
    if (sequence_[partner] != sequence_[lane]) ++faults;  // lanes at different shuffles
    const std::uint64_t theirs = slots_[partner];
    wait();
    return theirs;
  }

  std::int64_t faults = 0;  // shuffles some lane did not reach (see runtime.h)

 private:
  enum class State { running, at_barrier, done };

  static void entry();

  void wait() {
    const int lane = current_;
    state_[lane] = State::at_barrier;
    swapcontext(&lanes_[lane], &scheduler_);
  }

  const std::function<void()>* body_ = nullptr;
  std::int64_t block_ = 0;
  int warp_ = 0;
  int current_ = 0;
  ucontext_t scheduler_{};
  ucontext_t lanes_[kLanes]{};
  std::vector<char> stacks_[kLanes];
  State state_[kLanes]{};
  std::uint64_t slots_[kLanes] = {}, sequence_[kLanes] = {}, shuffles_[kLanes] = {};

  friend Warp& warp();
};

Warp& warp() {
  static Warp w;
  return w;
}

void Warp::entry() {
  Warp& w = warp();
  (*w.body_)();
  w.state_[w.current_] = State::done;
  // Returning resumes uc_link, the scheduler.
}

}  // namespace

void run(std::int64_t blocks, int threads, const std::function<void()>& body) {
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  for (std::int64_t b = 0; b < blocks; ++b)
    for (int w = 0; w < threads / kLanes; ++w) warp().run(body, b, w);
}

std::uint64_t exchange(std::uint64_t bits, int offset) { return warp().exchange(bits, offset); }
std::uint64_t read_lane(std::uint64_t bits, int lane) { return warp().read_lane(bits, lane & (kLanes - 1)); }

std::int64_t faults() { return warp().faults; }
void reset_faults() { warp().faults = 0; }

std::mutex& atomics() {
  static std::mutex m;
  return m;
}

}  // namespace msda_emulator
