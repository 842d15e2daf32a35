// What one expert changes in the base, gathered once per load in the forms an engine
// applies them:
//   deltas      each compressed matrix (linears, lm_head, the embedding) as a CompressedDelta
//               over the artifact's shards (its contents were checked by the artifact's
//               open, its layout is checked here); the fused kernels
//               multiply by it, a lookup dequantizes only the rows it reads;
//   whole       the tensors stored whole (norms, biases, a matrix the compressor kept dense),
//               views in their stored dtype: an engine widens what it uses;
//   extra rows  the rows past the base's of a delta matrix (an expanded vocabulary of the
//               embedding and lm_head), views in their stored dtype.
// Nothing is copied: every view points into the artifact's shard buffers, which this keeps
// alive, so an expert's memory is what the store counts for it (its shards).
//
// The rules of applying them that are not a GEMM live here too, once: how many rows an
// expert's matrix has (rows) and an embedding lookup (lookup: base row + delta row in
// float32, or the expert's own whole or extra row).
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "meswitch/artifact.hpp"
#include "meswitch/error.hpp"
#include "meswitch/half.hpp"
#include "meswitch/quantize.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {

class ExpertTensors {
 public:
  // Gathers from `artifact` (opened, so checked, and checked against the base by its
  // opener); applying a delta later checks nothing per call.
  explicit ExpertTensors(std::shared_ptr<const ExpertArtifact> artifact) : artifact_(std::move(artifact)) {
    if (!artifact_) throw Error("ExpertTensors: no artifact");
    for (const std::string& weight : artifact_->weight_names()) {
      const std::string kind = artifact_->kind(weight);
      if (kind == "full") {
        whole_.emplace(weight, artifact_->stored(weight + ".full"));
      } else if (kind == "delta") {
        deltas_.emplace(weight, artifact_->delta(weight, DeltaChecks::Layout));
        TensorView extra = artifact_->delta_extra_rows(weight);
        if (extra.data != nullptr) extra_rows_.emplace(weight, std::move(extra));
      }
    }
  }

  const ExpertArtifact& artifact() const { return *artifact_; }
  const std::shared_ptr<const ExpertArtifact>& shared_artifact() const { return artifact_; }
  const std::string& name() const { return artifact_->manifest().at("name").get_ref<const std::string&>(); }

  const std::map<std::string, CompressedDelta>& deltas() const { return deltas_; }
  const std::map<std::string, TensorView>& whole() const { return whole_; }
  const std::map<std::string, TensorView>& extra_rows() const { return extra_rows_; }

  const CompressedDelta* delta(const std::string& weight) const { return find(deltas_, weight); }
  const TensorView* whole(const std::string& weight) const { return find(whole_, weight); }
  const TensorView* extra_rows(const std::string& weight) const { return find(extra_rows_, weight); }

  // Rows of matrix `weight` in this expert: its own whole tensor's, or the base's
  // `base_rows` plus its extra rows.
  std::int64_t rows(const std::string& weight, std::int64_t base_rows) const {
    if (const TensorView* own = whole(weight)) return own->shape.at(0);
    const TensorView* extra = extra_rows(weight);
    return base_rows + (extra ? extra->shape.at(0) : 0);
  }

  // Rows `ids[0..count)` of this expert's matrix `weight` (an embedding) into float32
  // out [count, cols]: the expert's whole tensor's row; or, below the base's `base_rows`,
  // the base's row widened plus the delta's row dequantized, added in float32 and not
  // rounded back to the stored dtype (as the linears do); or, past them, the expert's extra
  // row. `base` [count, cols] (f16, bf16 or f32, rows contiguous) holds the base's row of
  // each id below `base_rows`, gathered by the caller wherever the table lives (other rows
  // are not read). Throws Error naming the expert for an id outside its rows, before
  // writing anything.
  void lookup(const std::string& weight, std::int64_t base_rows, const TensorView& base, const std::int64_t* ids,
              std::int64_t count, float* out) const {
    if (base.rank() != 2 || base.shape[0] != count || !base.is_contiguous())
      throw Error("lookup of '" + weight + "': the base's rows must be a contiguous [" + std::to_string(count) +
                  ", cols] tensor, got shape " + shape_string(base.shape));
    const std::int64_t cols = base.shape[1], total = rows(weight, base_rows);
    for (std::int64_t i = 0; i < count; ++i)
      if (ids[i] < 0 || ids[i] >= total)
        throw Error("token id " + std::to_string(ids[i]) + " is outside the vocabulary of " + name() + " (" +
                    std::to_string(total) + " tokens)");
    if (const TensorView* own = whole(weight)) {
      require_cols(weight, *own, cols);
      for (std::int64_t i = 0; i < count; ++i) widen_row(*own, ids[i], cols, out + i * cols);
      return;
    }
    const CompressedDelta* q = delta(weight);
    if (q != nullptr && (q->rows != base_rows || q->cols != cols))
      throw Error("lookup of '" + weight + "': the delta of " + name() + " is " + std::to_string(q->rows) + "x" +
                  std::to_string(q->cols) + ", the base's table " + std::to_string(base_rows) + "x" +
                  std::to_string(cols));
    const TensorView* extra = extra_rows(weight);
    if (extra != nullptr) require_cols(weight, *extra, cols);
    // One scratch row and code buffer for every id (dequantize_row: the rule).
    std::vector<float> delta_row(q != nullptr ? std::size_t(cols) : 0);
    std::vector<std::uint8_t> codes(delta_row.size());
    for (std::int64_t i = 0; i < count; ++i) {
      float* row = out + i * cols;
      if (ids[i] >= base_rows) {
        widen_row(*extra, ids[i] - base_rows, cols, row);
        continue;
      }
      widen_row(base, i, cols, row);
      if (q == nullptr) continue;
      dequantize_row(*q, ids[i], codes.data(), delta_row.data());
      for (std::int64_t c = 0; c < cols; ++c) row[c] += delta_row[std::size_t(c)];
    }
  }

  // The same over the whole base table (`table` [base rows, cols], rows contiguous, in host
  // memory): the rows are gathered here.
  void lookup(const std::string& weight, const TensorView& table, const std::int64_t* ids, std::int64_t count,
              float* out) const {
    if (table.rank() != 2 || !table.is_contiguous())
      throw Error("lookup of '" + weight + "': the base's table must be a contiguous 2-D tensor, got shape " +
                  shape_string(table.shape));
    const std::int64_t base_rows = table.shape[0], cols = table.shape[1];
    const std::size_t width = std::size_t(cols) * dtype_size(table.dtype);
    std::vector<unsigned char> gathered(std::size_t(count) * width);
    for (std::int64_t i = 0; i < count; ++i)
      if (ids[i] >= 0 && ids[i] < base_rows)
        std::memcpy(gathered.data() + std::size_t(i) * width,
                    static_cast<const unsigned char*>(table.data) + std::size_t(ids[i]) * width, width);
    lookup(weight, base_rows, TensorView(gathered.data(), table.dtype, {count, cols}), ids, count, out);
  }

 private:
  template <typename T>
  static const T* find(const std::map<std::string, T>& map, const std::string& key) {
    const auto found = map.find(key);
    return found == map.end() ? nullptr : &found->second;
  }

  void require_cols(const std::string& weight, const TensorView& view, std::int64_t cols) const {
    if (view.rank() != 2 || view.shape[1] != cols)
      throw Error("lookup of '" + weight + "': " + name() + "'s rows have shape " + shape_string(view.shape) +
                  ", the base table " + std::to_string(cols) + " columns");
  }

  // Row `r` of a contiguous 2-D floating tensor, widened into float32.
  static void widen_row(const TensorView& table, std::int64_t r, std::int64_t cols, float* out) {
    const auto* row = static_cast<const unsigned char*>(table.data) + std::size_t(r * cols) * dtype_size(table.dtype);
    convert_to_f32(row, table.dtype, out, std::size_t(cols));
  }

  std::shared_ptr<const ExpertArtifact> artifact_;
  std::map<std::string, CompressedDelta> deltas_;
  std::map<std::string, TensorView> whole_;
  std::map<std::string, TensorView> extra_rows_;
};

}  // namespace meswitch
