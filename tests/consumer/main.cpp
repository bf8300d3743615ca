// Calls the installed library through its public header only: one small forward, checked
// against the reference backend, and one bad input, which must be an msda::Error.
#include <msda/msda.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  msda::Problem p;
  p.batch = 1;
  p.queries = 3;
  p.heads = 2;
  p.channels = 4;
  p.points = 2;
  p.levels = {{4, 5}, {2, 3}};
  p.level_start_index = msda::level_starts(p.levels);
  p.value_len = 4 * 5 + 2 * 3;

  std::vector<float> value(p.batch * p.value_len * p.heads * p.channels);
  for (std::size_t i = 0; i < value.size(); ++i) value[i] = std::sin(0.37f * static_cast<float>(i));
  const std::int64_t samples = p.batch * p.queries * p.heads * p.num_levels() * p.points;
  std::vector<float> locations(2 * samples), weights(samples, 0.25f);
  for (std::size_t i = 0; i < locations.size(); ++i) locations[i] = 0.05f + 0.9f * std::fmod(0.618f * i, 1.0f);

  std::vector<float> out(p.batch * p.queries * p.heads * p.channels, NAN), ref(out.size(), NAN);
  msda::forward(p, {value.data(), locations.data(), weights.data()}, out.data());
  msda::Options reference;
  reference.backend = msda::Backend::reference;
  msda::forward(p, {value.data(), locations.data(), weights.data()}, ref.data(), reference);
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    err += (out[i] - ref[i]) * (out[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  if (!(norm > 0) || !(std::sqrt(err / norm) < 1e-5)) {
    std::printf("FAIL: relative error %g against the reference\n", std::sqrt(err / norm));
    return 1;
  }

  msda::Problem bad = p;
  bad.points = 0;
  try {
    msda::validate(bad);
    std::printf("FAIL: P = 0 was accepted\n");
    return 1;
  } catch (const msda::Error& e) {
    std::printf("bad input rejected: %s\n", e.what());
  }
  std::printf("PASS: installed msda %s, relative error %.1e\n", "found by find_package", std::sqrt(err / norm));
  return 0;
}
