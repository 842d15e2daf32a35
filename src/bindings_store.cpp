// Bindings for the expert store: argument checks and forwarding only. Every call that
// may wait for a load, or load, releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "meswitch/eviction.hpp"
#include "meswitch/store.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

py::dict report_dict(const StoreReport& report) {
  py::dict tiers;
  for (const StoreTierReport& tier : report.tiers) {
    py::dict entry;
    entry["used_bytes"] = tier.used_bytes;
    entry["budget_bytes"] = tier.budget_bytes;
    entry["entries"] = tier.entries;
    entry["loading"] = tier.loading;
    tiers[py::str(tier.tier)] = entry;
  }
  py::list experts;
  for (const StoreExpertReport& expert : report.experts) {
    py::dict entry;
    entry["name"] = expert.name;
    entry["directory"] = expert.directory;
    entry["tier"] = expert.tier;
    entry["bytes"] = expert.bytes;
    entry["holders"] = expert.holders;
    entry["claims"] = expert.claims;
    entry["pinned"] = expert.pinned;
    entry["loads"] = expert.loads;
    entry["load_seconds"] = expert.load_seconds;
    entry["waited_acquires"] = expert.waited_acquires;
    entry["wait_seconds"] = expert.wait_seconds;
    experts.append(entry);
  }
  py::dict result;
  result["tiers"] = tiers;
  result["experts"] = experts;
  result["hits"] = report.hits;
  result["misses"] = report.misses;
  result["evictions"] = report.evictions;
  result["loads"] = report.loads;
  result["verified_loads"] = report.verified_loads;
  result["load_failures"] = report.load_failures;
  result["prefetches_skipped"] = report.prefetches_skipped;
  result["recycled_buffers"] = report.recycled_buffers;
  result["load_seconds"] = report.load_seconds;
  return result;
}

}  // namespace

void bind_store(py::module_& m) {
  m.def(
      "choose_evictions",
      [](const std::string& tier, const std::string& expert, std::uint64_t bytes, std::uint64_t used,
         std::uint64_t budget, const std::vector<std::tuple<std::string, std::uint64_t, std::string>>& residents) {
        std::vector<TierResident> converted;
        for (const auto& [name, size, busy] : residents) converted.push_back({name, size, busy});
        return choose_evictions(tier, expert, bytes, used, budget, converted);
      },
      py::arg("tier"), py::arg("expert"), py::arg("bytes"), py::arg("used"), py::arg("budget"), py::arg("residents"));
  using Handle = ExpertStore::Handle;
  py::class_<Handle>(m, "ExpertHandle")
      .def_property_readonly("name", &Handle::name)
      .def_property_readonly("artifact",
                             [](const Handle& self) {
                               return std::const_pointer_cast<ExpertArtifact>(self.shared_artifact());
                             })
      .def("release", &Handle::release)
      .def("__bool__", [](const Handle& self) { return bool(self); });

  using Claim = ExpertStore::Claim;
  py::class_<Claim>(m, "ExpertClaim")
      .def("release", &Claim::release)
      .def("__bool__", [](const Claim& self) { return bool(self); });

  using BatchLease = ExpertStore::BatchLease;
  py::class_<BatchLease>(m, "BatchLease")
      .def("names", &BatchLease::names)
      .def(
          "artifact",
          [](const BatchLease& self, const std::string& name) {
            return std::const_pointer_cast<ExpertArtifact>(self[name].shared_artifact());
          },
          py::arg("name"))
      .def("release", &BatchLease::release)
      .def("__bool__", [](const BatchLease& self) { return !self.empty(); });

  py::class_<ExpertStore>(m, "ExpertStore")
      .def(py::init<const std::string&, const std::string&, std::uint64_t>(), py::arg("base_path"),
           py::arg("base_config_text"), py::arg("host_budget"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("host_budget", &ExpertStore::host_budget)
      .def("add", &ExpertStore::add, py::arg("directory"), py::call_guard<py::gil_scoped_release>())
      .def(
          "remove",
          [](ExpertStore& self, const std::string& name, double drain_seconds) {
            if (!(drain_seconds >= 0)) throw py::value_error("drain must be >= 0 seconds");
            self.remove(name, std::chrono::milliseconds(std::int64_t(drain_seconds * 1000)));
          },
          py::arg("name"), py::arg("drain_seconds") = 0.0, py::call_guard<py::gil_scoped_release>())
      .def("acquire_batch", &ExpertStore::acquire_batch, py::arg("names"), py::call_guard<py::gil_scoped_release>())
      .def("acquire", &ExpertStore::acquire, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      .def("acquire_if_resident", &ExpertStore::acquire_if_resident, py::arg("name"),
           py::call_guard<py::gil_scoped_release>())
      .def("claim", &ExpertStore::claim, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      .def("prefetch", &ExpertStore::prefetch, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      .def("wait", &ExpertStore::wait, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      .def("pin", &ExpertStore::pin, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      .def("unpin", &ExpertStore::unpin, py::arg("name"), py::call_guard<py::gil_scoped_release>())
      .def("names", &ExpertStore::names)
      .def("tier", [](const ExpertStore& self, const std::string& name) { return store_tier_name(self.tier(name)); },
           py::arg("name"))
      .def("memory_report", [](const ExpertStore& self) { return report_dict(self.memory_report()); });
}
