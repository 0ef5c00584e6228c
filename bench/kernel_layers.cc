// Times the native depthwise kernels (flax_mobilenet/native/kernels.cc) on every depthwise layer
// of MobileNetV1 and V2 at 224 x 224, batch 16, float32, on one thread: `python -m bench.kernels`
// (or `make kernel-bench`), which compiles it with the library's own flags.
//
// A whole training step's time moves between runs by more than a small kernel change is worth, so
// a kernel change is measured here first (the tables are in bench/NOTES.md). Each variant of a
// layer runs interleaved with the others, 9 times, with L3 flushed before each run (in a training
// step a layer's input was written long before); the medians are printed, with the traffic of one
// read of the inputs and one write of the output in GB/s. Where a layer fits two row kernels (fewer
// than 64 channels), both are timed and their outputs compared bit for bit.
#include "../flax_mobilenet/native/kernels.cc"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

namespace {

struct Layer { const char* model; int64_t h, c, s; };

const Layer kLayers[] = {
    {"v1", 112, 32, 1},  {"v1", 112, 64, 2},  {"v1", 56, 128, 1}, {"v1", 56, 128, 2}, {"v1", 28, 256, 1},
    {"v1", 28, 256, 2},  {"v1", 14, 512, 1},  {"v1", 14, 512, 2}, {"v1", 7, 1024, 1}, {"v2", 112, 32, 1},
    {"v2", 112, 96, 2},  {"v2", 56, 144, 1},  {"v2", 56, 144, 2}, {"v2", 28, 192, 1}, {"v2", 28, 192, 2},
    {"v2", 14, 384, 1},  {"v2", 14, 576, 1},  {"v2", 14, 576, 2}, {"v2", 7, 960, 1},
};

std::vector<float> g_flush(16 << 20, 1.0f);  // 64 MB, twice L3

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Runs each named variant 9 times, interleaved, L3 flushed before each; returns their medians (ms).
std::vector<double> Time(const std::vector<std::function<void()>>& variants) {
  std::vector<std::vector<double>> t(variants.size());
  for (int rep = 0; rep < 9; ++rep) {
    for (size_t v = 0; v < variants.size(); ++v) {
      volatile float sink = 0;
      for (size_t i = 0; i < g_flush.size(); i += 16) sink = sink + g_flush[i];
      const auto t0 = std::chrono::steady_clock::now();
      variants[v]();
      StreamFence();
      t[v].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  std::vector<double> out;
  for (auto& v : t) out.push_back(Median(v));
  return out;
}

bool Same(const std::vector<float>& a, const std::vector<float>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), [](float p, float q) { return std::memcmp(&p, &q, 4) == 0; });
}

}  // namespace

int main() {
  const int64_t N = 16;
  std::printf("| model | layer | stride | forward ms (GB/s) | input gradient ms | kernel gradient ms |\n");
  std::printf("| --- | --- | --- | --- | --- | --- |\n");
  for (const Layer& l : kLayers) {
    const int64_t ho = (l.h - 1) / l.s + 1;
    const Shape d{N, l.h, l.h, l.c, 3, l.s, 1, ho, ho};
    std::vector<float> x(N * l.h * l.h * l.c), k(9 * l.c), g(N * ho * ho * l.c);
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    for (auto* v : {&x, &k, &g})
      for (auto& e : *v) e = normal(rng);
    std::vector<float> y(g.size()), y2(g.size()), dx(x.size()), dx2(x.size()), dk(9 * l.c);
    const bool row_taps = RowTapsFits<float>(d);
    const double gb = (x.size() + y.size()) * 4 / 1e6;  // one read of x, one write of y (MB, per ms = GB/s)

    std::vector<std::function<void()>> fwd = {
        [&] { for (int64_t r = 0; r < N * ho; ++r) ForwardRow(d, x.data(), k.data(), y.data(), r, Store<float>{}); }};
    if (row_taps) fwd.push_back([&] { for (int64_t r = 0; r < N * ho; ++r) RowTapsForwardRow(d, x.data(), k.data(), y2.data(), r, Store<float>{}); });
    std::vector<std::function<void()>> ig = {
        [&] { for (int64_t r = 0; r < N * l.h; ++r) InputGradRow(d, g.data(), k.data(), dx.data(), r); }};
    if (row_taps && l.s == 1) ig.push_back([&] { for (int64_t r = 0; r < N * l.h; ++r) RowTapsInputGradRow(d, g.data(), k.data(), dx2.data(), r); });
    const auto tf = Time(fwd), ti = Time(ig);
    const auto tk = Time({[&] { std::fill(dk.begin(), dk.end(), 0.0f); for (int64_t r = 0; r < N * ho; ++r) KernelGradRow(d, x.data(), g.data(), dk.data(), r); }});

    char f[96], i[96];
    if (tf.size() > 1) std::snprintf(f, sizeof f, "%.2f (%.1f) -> row taps %.2f (%.1f)%s", tf[0], gb / tf[0], tf[1], gb / tf[1], Same(y, y2) ? "" : " DIFFERENT");
    else std::snprintf(f, sizeof f, "%.2f (%.1f)", tf[0], gb / tf[0]);
    if (ti.size() > 1) std::snprintf(i, sizeof i, "%.2f -> row taps %.2f%s", ti[0], ti[1], Same(dx, dx2) ? "" : " DIFFERENT");
    else std::snprintf(i, sizeof i, "%.2f", ti[0]);
    std::printf("| %s | %ld x %ld x %ld | %ld | %s | %s | %.2f |\n", l.model, l.h, l.h, l.c, l.s, f, i, tk[0]);
  }
}
