#include "workloads.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <stdexcept>

#include "numeric.h"

namespace msda::workloads {

std::string_view name(Locations locations) {
  switch (locations) {
    case Locations::encoder: return "encoder";
    case Locations::decoder: return "decoder";
    case Locations::random: return "random";
  }
  return "unknown";
}

Locations parse_locations(std::string_view text) {
  for (Locations l : {Locations::encoder, Locations::decoder, Locations::random})
    if (text == name(l)) return l;
  throw std::invalid_argument("locations: expected encoder, decoder or random, got " + std::string(text));
}

Problem make_problem(std::int64_t N, std::int64_t Q, std::int64_t M, std::int64_t D, std::int64_t P,
                     std::vector<Level> levels) {
  Problem p;
  p.batch = N;
  p.queries = Q;
  p.heads = M;
  p.channels = D;
  p.points = P;
  p.levels = std::move(levels);
  p.level_start_index = level_starts(p.levels);
  p.value_len = 0;
  for (const Level& l : p.levels) p.value_len += l.height * l.width;
  return p;
}

const std::vector<Workload>& named() {
  static const std::vector<Workload> workloads = [] {
    const std::vector<Level> ddetr{{100, 134}, {50, 67}, {25, 34}, {13, 17}};
    const std::vector<Level> m2f{{128, 128}, {64, 64}, {32, 32}};
    const std::vector<Level> rtdetr{{80, 80}, {40, 40}, {20, 20}};
    const std::vector<Level> bev_sca{{116, 200}, {58, 100}, {29, 50}, {15, 25}};
    return std::vector<Workload>{
        {"ddetr-enc", "Deformable DETR encoder, 800x1066", make_problem(1, 17821, 8, 32, 4, ddetr), Locations::encoder},
        {"ddetr-dec", "Deformable DETR decoder", make_problem(1, 300, 8, 32, 4, ddetr), Locations::decoder},
        {"dino-dec", "DINO / Grounding DINO decoder", make_problem(1, 900, 8, 32, 4, ddetr), Locations::decoder},
        {"m2f-enc", "Mask2Former pixel decoder, 1024x1024", make_problem(1, 21504, 8, 32, 4, m2f), Locations::encoder},
        {"rtdetr-dec", "RT-DETR decoder, 640x640", make_problem(1, 300, 8, 32, 4, rtdetr), Locations::decoder},
        {"bev-tsa", "BEVFormer temporal self-attention", make_problem(2, 40000, 8, 32, 4, {{200, 200}}),
         Locations::encoder},
        {"bev-sca", "BEVFormer spatial cross-attention, 6 cameras", make_problem(6, 2500, 8, 32, 8, bev_sca),
         Locations::decoder},
    };
  }();
  return workloads;
}

const Workload& find(std::string_view wanted) {
  std::string names;
  for (const Workload& w : named()) {
    if (w.name == wanted) return w;
    names += (names.empty() ? "" : ", ") + w.name;
  }
  throw std::invalid_argument("workload: expected one of " + names + ", got " + std::string(wanted));
}

std::vector<std::byte> from_double(const std::vector<double>& x, DType dtype) {
  std::vector<std::byte> out(x.size() * size_of(dtype));
  auto fill = [&]<class T>() {
    T* dst = reinterpret_cast<T*>(out.data());
    for (std::size_t i = 0; i < x.size(); ++i) dst[i] = Storage<T>::store(static_cast<typename Storage<T>::Compute>(x[i]));
  };
  switch (dtype) {
    case DType::f32: fill.template operator()<float>(); break;
    case DType::f64: fill.template operator()<double>(); break;
    case DType::bf16: fill.template operator()<bf16>(); break;
    case DType::f16: fill.template operator()<f16>(); break;
  }
  return out;
}

std::vector<double> to_double(const void* data, DType dtype, std::int64_t count) {
  std::vector<double> out(static_cast<std::size_t>(count));
  auto read = [&]<class T>() {
    const T* src = static_cast<const T*>(data);
    for (std::int64_t i = 0; i < count; ++i) out[i] = Storage<T>::load(src[i]);
  };
  switch (dtype) {
    case DType::f32: read.template operator()<float>(); break;
    case DType::f64: read.template operator()<double>(); break;
    case DType::bf16: read.template operator()<bf16>(); break;
    case DType::f16: read.template operator()<f16>(); break;
  }
  return out;
}

Data generate(const Problem& p, Locations kind, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0), offset(-4.0, 4.0);
  const std::int64_t L = p.num_levels();

  std::vector<double> value(static_cast<std::size_t>(p.batch * p.value_len * p.heads * p.channels));
  for (double& v : value) v = normal(rng);

  // The pixel centre of every row of value, for encoder queries (query q sits on row q mod S).
  std::vector<double> centre_x, centre_y;
  if (kind == Locations::encoder) {
    for (const Level& level : p.levels)
      for (std::int64_t h = 0; h < level.height; ++h)
        for (std::int64_t w = 0; w < level.width; ++w) {
          centre_x.push_back((static_cast<double>(w) + 0.5) / static_cast<double>(level.width));
          centre_y.push_back((static_cast<double>(h) + 0.5) / static_cast<double>(level.height));
        }
  }

  const std::int64_t samples = p.batch * p.queries * p.heads * L * p.points;
  std::vector<double> loc(static_cast<std::size_t>(2 * samples)), weight(static_cast<std::size_t>(samples));
  std::int64_t i = 0;
  for (std::int64_t n = 0; n < p.batch; ++n)
    for (std::int64_t q = 0; q < p.queries; ++q) {
      double ref_x = 0, ref_y = 0;
      if (kind == Locations::encoder) {
        ref_x = centre_x[q % p.value_len];
        ref_y = centre_y[q % p.value_len];
      } else if (kind == Locations::decoder) {
        ref_x = unit(rng);
        ref_y = unit(rng);
      }
      for (std::int64_t m = 0; m < p.heads; ++m) {
        // Weights: softmax over the L*P logits of this (n, q, m).
        const std::int64_t first = i;
        double total = 0;
        for (std::int64_t k = 0; k < L * p.points; ++k) total += (weight[first + k] = std::exp(normal(rng)));
        for (std::int64_t k = 0; k < L * p.points; ++k) weight[first + k] /= total;
        for (std::int64_t l = 0; l < L; ++l)
          for (std::int64_t pt = 0; pt < p.points; ++pt, ++i) {
            if (kind == Locations::random) {
              loc[2 * i] = unit(rng);
              loc[2 * i + 1] = unit(rng);
            } else {
              loc[2 * i] = ref_x + offset(rng) / static_cast<double>(p.levels[l].width);
              loc[2 * i + 1] = ref_y + offset(rng) / static_cast<double>(p.levels[l].height);
            }
          }
      }
    }
  return Data{from_double(value, p.value_dtype), from_double(loc, p.location_dtype),
              from_double(weight, p.weight_dtype)};
}

double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return INFINITY;
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) && !(std::isnan(want[i]) ? std::isnan(got[i]) : got[i] == want[i])) return INFINITY;
    if (!std::isfinite(want[i])) continue;
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  if (norm == 0) return diff == 0 ? 0 : INFINITY;
  return std::sqrt(diff / norm);
}

double median_ms(int repeats, const std::function<void()>& f, int warmups) {
  for (int w = 0; w < warmups; ++w) f();  // page faults, caches
  std::vector<double> times;
  for (int r = 0; r < std::max(repeats, 1); ++r) {
    const auto start = std::chrono::steady_clock::now();
    f();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace msda::workloads
