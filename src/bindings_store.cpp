// Bindings for the expert store: argument checks and forwarding only. Every call that
// may wait for a load, or load, releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.hpp"
#include "meswitch/eviction.hpp"
#include "meswitch/expert_tensors.hpp"
#include "meswitch/store.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

using IdArray = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

template <typename T>
std::vector<std::string> keys(const std::map<std::string, T>& map) {
  std::vector<std::string> names;
  for (const auto& item : map) names.push_back(item.first);
  return names;
}

// A whole tensor or extra rows widened to a new float32 array; None when there is none.
py::object widened(const TensorView* view) {
  if (view == nullptr) return py::none();
  py::array_t<float> out(std::vector<py::ssize_t>(view->shape.begin(), view->shape.end()));
  convert_to_f32(view->data, view->dtype, out.mutable_data(), std::size_t(view->numel()));
  return std::move(out);
}

const std::int64_t* checked_ids(const IdArray& ids) {
  if (ids.ndim() != 1) throw py::value_error("ids: expected 1-D, got " + std::to_string(ids.ndim()) + "-D");
  return ids.data();
}

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
  py::class_<ExpertTensors, std::shared_ptr<ExpertTensors>>(m, "ExpertTensors")
      .def(py::init([](std::shared_ptr<ExpertArtifact> artifact) { return std::make_shared<ExpertTensors>(artifact); }),
           py::arg("artifact"))
      .def_property_readonly("name", &ExpertTensors::name)
      .def_property_readonly("artifact",
                             [](const ExpertTensors& self) {
                               return std::const_pointer_cast<ExpertArtifact>(self.shared_artifact());
                             })
      .def("delta_names", [](const ExpertTensors& self) { return keys(self.deltas()); })
      .def("whole_names", [](const ExpertTensors& self) { return keys(self.whole()); })
      .def("extra_row_names", [](const ExpertTensors& self) { return keys(self.extra_rows()); })
      .def("whole", [](const ExpertTensors& self, const std::string& name) { return widened(self.whole(name)); },
           py::arg("name"), "the whole tensor `name` as a new float32 array, or None")
      .def("extra_rows",
           [](const ExpertTensors& self, const std::string& name) { return widened(self.extra_rows(name)); },
           py::arg("name"), "the extra rows of delta `name` as a new float32 array, or None")
      .def("rows", &ExpertTensors::rows, py::arg("name"), py::arg("base_rows"))
      .def(
          "lookup",
          [](const ExpertTensors& self, const std::string& name, py::handle table, const IdArray& ids) {
            const std::int64_t* wanted = checked_ids(ids);
            const bindings::HostTensor base = bindings::host_tensor(table, "table");
            const std::int64_t cols = base.view.rank() == 2 ? base.view.shape[1] : 0;
            py::array_t<float> out({py::ssize_t(ids.shape(0)), py::ssize_t(cols)});
            float* destination = out.mutable_data();
            bindings::without_gil([&] { self.lookup(name, base.view, wanted, ids.shape(0), destination); });
            return out;
          },
          py::arg("name"), py::arg("table"), py::arg("ids"),
          "rows `ids` of matrix `name` (an embedding) over the base's whole host table, float32")
      .def(
          "lookup_gathered",
          [](const ExpertTensors& self, const std::string& name, std::int64_t base_rows, py::handle base,
             const IdArray& ids) {
            const std::int64_t* wanted = checked_ids(ids);
            const bindings::HostTensor rows = bindings::host_tensor(base, "base");
            const std::int64_t cols = rows.view.rank() == 2 ? rows.view.shape[1] : 0;
            py::array_t<float> out({py::ssize_t(ids.shape(0)), py::ssize_t(cols)});
            float* destination = out.mutable_data();
            bindings::without_gil([&] { self.lookup(name, base_rows, rows.view, wanted, ids.shape(0), destination); });
            return out;
          },
          py::arg("name"), py::arg("base_rows"), py::arg("base"), py::arg("ids"),
          "the same with the base's row of each id (below base_rows) gathered by the caller");

  using Handle = ExpertStore::Handle;
  py::class_<Handle>(m, "ExpertHandle")
      .def_property_readonly("name", &Handle::name)
      .def_property_readonly("artifact",
                             [](const Handle& self) {
                               return std::const_pointer_cast<ExpertArtifact>(self.shared_artifact());
                             })
      .def_property_readonly("tensors",
                             [](const Handle& self) {
                               return std::const_pointer_cast<ExpertTensors>(self.shared_tensors());
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
      .def(
          "tensors",
          [](const BatchLease& self, const std::string& name) {
            return std::const_pointer_cast<ExpertTensors>(self[name].shared_tensors());
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
