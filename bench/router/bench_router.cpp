// Router latency in C++: p50/p99 of Router::route per query and queries per second on
// one thread. Queries come from a file, one JSON string per line (bench_router.py
// writes 300-character queries cut from the held-out sets).
//
//   bench_router ROUTER_DIR QUERIES.jsonl [ROUNDS]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "meswitch/router.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s ROUTER_DIR QUERIES.jsonl [ROUNDS]\n", argv[0]);
    return 2;
  }
  const meswitch::Router router = meswitch::Router::load(argv[1]);
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 20;
  std::vector<std::string> queries;
  std::ifstream stream(argv[2]);
  for (std::string line; std::getline(stream, line);)
    if (!line.empty()) queries.push_back(nlohmann::json::parse(line).get<std::string>());
  if (queries.empty()) return 2;

  using clock = std::chrono::steady_clock;
  std::size_t sink = 0;
  for (const std::string& query : queries) sink += router.route(query).expert.size();  // warm the caches
  std::vector<double> micros;
  micros.reserve(queries.size() * std::size_t(rounds));
  const auto started = clock::now();
  for (int round = 0; round < rounds; ++round)
    for (const std::string& query : queries) {
      const auto begin = clock::now();
      sink += router.route(query).expert.size();
      micros.push_back(std::chrono::duration<double, std::micro>(clock::now() - begin).count());
    }
  const double seconds = std::chrono::duration<double>(clock::now() - started).count();
  std::sort(micros.begin(), micros.end());
  const auto at = [&](double q) { return micros[std::size_t(q * double(micros.size() - 1))]; };
  double bytes = 0;
  for (const std::string& query : queries) bytes += double(query.size());
  std::printf("{\"path\": \"C++ Router::route\", \"queries\": %zu, \"mean_bytes\": %.0f, \"p50_us\": %.2f, "
              "\"p99_us\": %.2f, \"queries_per_second\": %.0f, \"sink\": %zu}\n",
              micros.size(), bytes / double(queries.size()), at(0.5), at(0.99), double(micros.size()) / seconds,
              sink);
  return 0;
}
