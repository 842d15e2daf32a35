// The eviction rule every budgeted tier keeps (eviction.hpp).
#include <catch2/catch.hpp>

#include "meswitch/eviction.hpp"

using namespace meswitch;

TEST_CASE("choose_evictions takes the least recently used idle residents until the expert fits", "[eviction]") {
  // Budget 100; 90 used: a (30, idle), b (20, held), c (25, idle), d (15, idle), oldest first.
  const std::vector<TierResident> residents{{"a", 30, ""}, {"b", 20, "held"}, {"c", 25, ""}, {"d", 15, ""}};
  REQUIRE(choose_evictions("host", "new", 10, 90, 100, residents).empty());            // fits as it is
  REQUIRE(choose_evictions("host", "new", 20, 90, 100, residents) == std::vector<std::size_t>{0});
  REQUIRE(choose_evictions("host", "new", 45, 90, 100, residents) == std::vector<std::size_t>{0, 2});
  REQUIRE(choose_evictions("host", "new", 80, 90, 100, residents) == std::vector<std::size_t>{0, 2, 3});
}

TEST_CASE("choose_evictions refuses before evicting, naming the busy residents", "[eviction]") {
  const std::vector<TierResident> residents{{"a", 30, "pinned"}, {"b", 20, "held"}, {"c", 25, ""},
                                            {"e", 10, "loading"}};
  // 85 used, 25 of it idle: 60 busy, so 41 can never fit beside them today.
  try {
    choose_evictions("cuda:0", "new", 41, 85, 100, residents);
    FAIL("no TierFull");
  } catch (const TierFull& error) {
    const std::string message = error.what();
    REQUIRE_THAT(message, Catch::Contains("cannot load expert 'new' (41 bytes): the cuda:0 tier's budget is 100 bytes "
                                          "and 60 of them are held, pinned or loading: a (30 bytes, pinned), "
                                          "b (20 bytes, held), e (10 bytes, loading)"));
  }
  REQUIRE(choose_evictions("cuda:0", "new", 40, 85, 100, residents) == std::vector<std::size_t>{2});
}

TEST_CASE("choose_evictions: an expert larger than the whole budget is an Error, not TierFull", "[eviction]") {
  REQUIRE_THROWS_WITH(choose_evictions("host", "huge", 101, 0, 100, {}),
                      "expert 'huge' needs 101 bytes of host memory, more than the host tier's whole budget of 100 bytes");
  try {
    check_fits_tier("host", "huge", 101, 100);
    FAIL("no Error");
  } catch (const TierFull&) {
    FAIL("an expert that can never fit is not TierFull");
  } catch (const Error&) {
  }
  check_fits_tier("host", "fits", 100, 100);
}
