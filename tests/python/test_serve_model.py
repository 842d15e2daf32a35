"""The multi-expert model against transformers: one flattened batch mixing the base and the three
bundled experts (ragged prompts, prefill then decode, a sequence joining mid-way) gives each
sequence the logits of that expert's decompressed model run alone; and the paged KV cache,
the architecture checks and rotary scaling behave as documented."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from meswitch import ops
from meswitch.artifact import decompress
from meswitch.checkpoint import open_checkpoint, save_file
from meswitch.compress import CompressionSettings, compress
from meswitch.family import family_dir
from meswitch.serve import KVCacheFull, MultiExpertModel, PagedKVCache, SequenceInput, generate
from meswitch.serve.engine.attention import AttentionBatch, paged_attention, reference_paged_attention
from meswitch.serve.engine.generate import expert_tokenizer
from meswitch.serve.engine.rope import inverse_frequencies

transformers = pytest.importorskip("transformers")

EXPERTS = ("chat", "math", "code")
PROMPTS = {
    None: "The river runs past the old mill and",
    "chat": "<|user|>do you like hiking in the mountains?<|end|>\n<|assistant|>",
    "math": "Tara has 12 shells. Tara finds 9 more shells. How many shells does Tara have now?\n",
    "code": "def read_config(path):\n",
}
LATE_PROMPT = "Sam has 4 apples and buys 3 more."  # joins the batch at step JOIN_STEP, with math
DECODE_STEPS, JOIN_STEP = 20, 10
SAMPLING_SEED = 3
# Each sequence's logits vs its decompressed model through transformers (float32), as a fraction
# of the largest logit. The decompressed checkpoint holds the weights rounded to the expert's
# float16, while the model here adds the delta to the base in float32; and the model holds its
# keys and values in the bundled base's float16 (transformers here: float32). Measured
# 1.8-2.0e-4 for the experts, 8e-5 for the base alone (the KV cache's rounding only; ~1e-6 with
# a float32 cache). The fused kernel's activation digits on VNNI CPUs (two int8 digits,
# ~3-5e-5) stay well inside. Bound: 1e-3.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Artifacts and decompressed HF directories of the three bundled experts."""
    root, source = tmp_path_factory.mktemp("serve"), family_dir()
    artifacts, dense = {}, {None: source / "base"}
    for name in EXPERTS:
        artifacts[name] = root / f"{name}.meswitch"
        compress(source / "base", source / name, artifacts[name], progress=False,
                 settings=CompressionSettings(bits=2))
        dense[name] = decompress(source / "base", artifacts[name], root / f"{name}-dense")
    return {"base": source / "base", "artifacts": artifacts, "dense": dense}


@pytest.fixture(scope="module")
def model(family):
    return MultiExpertModel(family["base"], family["artifacts"], kv_cache_bytes=8 << 20, block_size=16)


def _reference_logits(directory, tokens: list[int]) -> torch.Tensor:
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(input_ids=torch.tensor([tokens])).logits[0]


def test_mixed_batch_matches_transformers(family, model):
    prompts = {name: list(expert_tokenizer(model, name)(text)["input_ids"]) for name, text in PROMPTS.items()}
    prompts["late"] = list(expert_tokenizer(model, "math")(LATE_PROMPT)["input_ids"])
    experts = {name: name for name in PROMPTS} | {"late": "math"}
    assert len({len(tokens) for tokens in prompts.values()}) > 3  # ragged
    fed = {name: [] for name in prompts}
    logits = {name: [] for name in prompts}
    pending = {name: tokens for name, tokens in prompts.items() if name != "late"}
    free_at_start = model.cache.free_blocks
    for step in range(DECODE_STEPS + 1):
        if step == JOIN_STEP:
            pending["late"] = prompts["late"]  # its prefill shares a forward with the others' decode
        batch = [SequenceInput(name, experts[name], tokens) for name, tokens in pending.items()]
        outputs = model.forward(batch)
        for item, rows in zip(batch, outputs):
            fed[item.sequence] += item.tokens
            logits[item.sequence].append(rows)
            pending[item.sequence] = [int(rows[-1].argmax())]  # greedy
    scales = {}
    for name, rows in logits.items():
        ours = torch.cat(rows)
        assert ours.shape == (len(fed[name]), model.vocab_size(experts[name]))
        reference = _reference_logits(family["dense"][experts[name]], fed[name])
        assert reference.shape == ours.shape  # chat: its own 4099-token vocabulary
        scales[name] = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert max(scales.values()) < TOLERANCE, scales
    assert model.vocab_size("chat") == 4099 and model.vocab_size(None) == 4096
    for name in prompts:
        model.free(name)
    assert model.cache.free_blocks == free_at_start


def test_generate_matches_transformers_greedy(family, model):
    tokenizer = expert_tokenizer(model, "code")
    ids = tokenizer(PROMPTS["code"], return_tensors="pt")["input_ids"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(family["dense"]["code"], dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    free_at_start = model.cache.free_blocks
    text = generate(model, "code", PROMPTS["code"], max_tokens=12, stop_at_eos=False)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert model.cache.free_blocks == free_at_start  # the request's blocks went back
    # Sampling: the same seeded draws from the decompressed chat model's distributions (transformers)
    # give the same text; the seed is one whose draws leave the greedy path, so sampling is exercised.
    chat = expert_tokenizer(model, "chat")
    prompt = list(chat(PROMPTS["chat"])["input_ids"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(family["dense"]["chat"], dtype=torch.float32)
    generator, drawn, greedy = torch.Generator().manual_seed(SAMPLING_SEED), [], []
    with torch.no_grad():
        for _ in range(6):
            logits = reference(input_ids=torch.tensor([prompt + drawn])).logits[0, -1]
            greedy.append(int(logits.argmax()))
            drawn.append(int(torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator)))
    assert drawn != greedy
    sampled = generate(model, "chat", PROMPTS["chat"], max_tokens=6, temperature=0.8, seed=SAMPLING_SEED,
                       stop_at_eos=False)
    assert sampled == chat.decode(drawn, skip_special_tokens=True) and sampled


def test_unknown_architecture_is_refused_by_name(tmp_path):
    config = json.loads((family_dir() / "base" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox",
                                                      "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="gpt_neox.*GPTNeoXForCausalLM"):
        MultiExpertModel(tmp_path, {})


def test_kv_cache_exhaustion_and_free(model):
    cache = PagedKVCache(num_layers=2, kv_heads=2, head_dim=8, budget_bytes=3 * 2 * 2 * 4 * 2 * 8 * 4, block_size=4)
    assert cache.num_blocks == 3
    cache.reserve({"a": 5})  # two blocks
    assert cache.block_table("a") == [0, 1] and cache.free_blocks == 1
    with pytest.raises(KVCacheFull, match="needs 2 more blocks.*1 of 3 are free"):
        cache.reserve({"b": 4, "c": 1})
    assert cache.free_blocks == 1 and "b" not in cache  # all or nothing
    cache.reserve({"a": 3})  # fills block 1, no new block
    assert cache.free_blocks == 1 and cache.length("a") == 8
    cache.free("a")
    assert cache.free_blocks == 3 and cache.length("a") == 0
    with pytest.raises(ValueError, match="holds no block"):
        PagedKVCache(1, 1, 8, budget_bytes=10)
    # Through the model: a prompt longer than the pool raises before touching the cache.
    small = MultiExpertModel(model.base_dir, {}, kv_cache_bytes=2 * model.cache.block_bytes, block_size=16)
    with pytest.raises(KVCacheFull, match="KV cache exhausted"):
        small.forward([SequenceInput("long", None, list(range(40)))])
    assert small.cache.free_blocks == 2
    small.forward([SequenceInput("short", None, list(range(20)))])
    assert small.cache.free_blocks == 0
    small.free("short")
    assert small.cache.free_blocks == 2


@pytest.mark.parametrize("parameters", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(parameters):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                                      rope_parameters=dict(parameters))
    expected, _ = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(parameters, 64), expected.to(torch.float32), rtol=1e-6, atol=0)
    with pytest.raises(NotImplementedError, match="'yarn'"):
        inverse_frequencies({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, 64)


def _variant(base, out, model_type: str, **changes):
    """The bundled base rewritten as another architecture (same weights; Qwen2 gains q/k/v biases)."""
    out.mkdir()
    for path in base.iterdir():
        if path.name != "model.safetensors" and path.name != "config.json":
            shutil.copy(path, out / path.name)
    config = json.loads((base / "config.json").read_text())
    architecture = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    config.update(model_type=model_type, architectures=[architecture], **changes)
    (out / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(base)
    tensors = {name: np.array(checkpoint.get_array(name, widen=True)) for name in checkpoint}
    if model_type == "qwen2":
        rng = np.random.default_rng(7)
        for layer in range(config["num_hidden_layers"]):
            for projection in ("q_proj", "k_proj", "v_proj"):
                rows = tensors[f"model.layers.{layer}.self_attn.{projection}.weight"].shape[0]
                tensors[f"model.layers.{layer}.self_attn.{projection}.bias"] = rng.normal(0, 0.5, rows).astype(np.float32)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize("model_type, changes", [
    ("mistral", {"sliding_window": 8}),  # windowed attention: the prompt is longer than the window
    ("qwen2", {"use_sliding_window": False}),  # biases on q, k, v
])
def test_other_architectures_match_transformers(tmp_path, model_type, changes):
    directory = _variant(family_dir() / "base", tmp_path / model_type, model_type, **changes)
    model = MultiExpertModel(directory, {}, kv_cache_bytes=1 << 20, block_size=4)
    assert model.dtype == torch.float32  # a float32 checkpoint stays float32
    tokens = list(range(5, 25))
    # The prompt in two chunks (the second continues over cached keys), then three decode steps.
    rows = [model.forward([SequenceInput(0, None, tokens[:12])])[0], model.forward([SequenceInput(0, None, tokens[12:])])[0]]
    for _ in range(3):
        token = int(rows[-1][-1].argmax())
        tokens.append(token)
        rows.append(model.forward([SequenceInput(0, None, [token])])[0])
    ours = torch.cat(rows)
    reference = _reference_logits(directory, tokens)
    # float32 on both sides, the same weights: only summation order differs (measured ~1e-6).
    assert ((ours - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_a_store_holds_each_expert_for_the_whole_forward(family):
    """Any object with acquire/release serves as the expert source; every acquire is released."""

    class CountingStore:
        def __init__(self, artifacts):
            self.artifacts, self.held, self.peak, self.acquires = artifacts, {}, {}, 0

        def acquire(self, name):
            self.acquires += 1
            self.held[name] = self.held.get(name, 0) + 1
            self.peak[name] = max(self.peak.get(name, 0), self.held[name])
            from meswitch.artifact import load_artifact

            return load_artifact(self.artifacts[name])

        def release(self, name):
            self.held[name] -= 1

    store = CountingStore(family["artifacts"])
    model = MultiExpertModel(family["base"], store, kv_cache_bytes=1 << 20)
    rows = model.forward([SequenceInput("a", "math", [5, 6, 7]), SequenceInput("b", None, [8])])
    assert rows[0].shape == (3, 4096) and rows[1].shape == (1, 4096)
    # One hold for the whole forward (its tensors are prepared over the same hold), released at the end.
    assert store.held == {"math": 0} and store.peak["math"] == 1 and store.acquires == 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_embedding_rows_are_the_dequantized_delta_rows(tmp_path, bits):
    """An embedding lookup dequantizes only the rows it reads: bit for bit the rows of the whole
    delta (3 bits: codes straddle words; a ragged last group; salient channels)."""
    source = family_dir()
    artifact_dir = tmp_path / "math.meswitch"
    compress(source / "base", source / "math", artifact_dir, progress=False,
             settings=CompressionSettings(bits=bits, group_size=96, salient_channels=5))
    from meswitch.artifact import load_artifact

    artifact = load_artifact(artifact_dir)
    rows = np.array([0, 7, 7, 4095, 1234, 3])
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        whole = artifact.delta(name)
        picked = rows[rows < whole.shape[0]]
        np.testing.assert_array_equal(ops.delta_rows((artifact, name), picked), whole[picked])
        with pytest.raises(ValueError, match=f"row {whole.shape[0]} is outside delta '{name}'"):
            ops.delta_rows((artifact, name), [0, whole.shape[0]])


def _tied(directory, out):
    """A copy of a family model with its output layer tied to the embedding (no lm_head)."""
    out.mkdir()
    for path in directory.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, out / path.name)
    config = json.loads((directory / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(directory)
    save_file({name: np.array(checkpoint.get_array(name)) for name in checkpoint if name != "lm_head.weight"},
              out / "model.safetensors")
    return out


def test_tied_embeddings_with_an_expanded_vocabulary_match_transformers(tmp_path):
    """Tied output layer: the logits are the base's by one GEMM plus the embedding delta by the fused
    kernel plus the added tokens' rows; the chat expert's added tokens exercise both lookups."""
    source = family_dir()
    base, chat = _tied(source / "base", tmp_path / "base"), _tied(source / "chat", tmp_path / "chat")
    artifact = tmp_path / "chat.meswitch"
    compress(base, chat, artifact, progress=False, settings=CompressionSettings(bits=2))
    dense = decompress(base, artifact, tmp_path / "chat-dense")
    model = MultiExpertModel(base, {"chat": artifact}, kv_cache_bytes=1 << 20)
    assert model.vocab_size("chat") > model.vocab_size(None)
    tokens = [*range(3, 15), model.vocab_size("chat") - 1, model.vocab_size(None)]  # two added tokens
    ours = model.forward([SequenceInput("c", "chat", tokens), SequenceInput("b", None, tokens[:12])])
    for logits, directory, used in ((ours[0], dense, tokens), (ours[1], base, tokens[:12])):
        reference = _reference_logits(directory, used)
        assert logits.shape == reference.shape
        assert ((logits - reference).abs().max() / reference.abs().max()).item() < TOLERANCE


def _cast(base, out, dtype: torch.dtype):
    """A copy of a family model with every tensor stored in ``dtype`` (config.json says so)."""
    out.mkdir()
    for path in base.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            shutil.copy(path, out / path.name)
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(base)
    save_file({name: torch.from_numpy(np.array(checkpoint.get_array(name, widen=True))).to(dtype) for name in checkpoint},
              out / "model.safetensors")
    return out


def _chunked_run(model, tokens: list[int], other: list[int]) -> torch.Tensor:
    """``tokens`` through ``model`` as two prefill chunks and then one token a step, beside a second
    sequence (``other``) that shares every forward: its prefill with the first chunk, then decodes."""
    rows = [model.forward([SequenceInput("a", None, tokens[:20]), SequenceInput("b", None, other)])[0]]
    rows.append(model.forward([SequenceInput("a", None, tokens[20:30]), SequenceInput("b", None, [7])])[0])
    for position in range(30, len(tokens)):
        rows.append(model.forward([SequenceInput("b", None, [8]), SequenceInput("a", None, [tokens[position]])])[1])
    model.free("a")
    model.free("b")
    return torch.cat(rows)


# 16-bit bases against transformers, as fractions of the largest logit. Two references on the
# same 16-bit weights: transformers in float32 and transformers in the 16-bit dtype. Against
# float32 the model differs only by its keys and values rounded to the 16-bit dtype in the
# cache (its activations are float32): measured 8.5e-4 (bfloat16), 1.5e-4 (float16); bounds
# 3e-3 and 5e-4. Against transformers in 16 bit the difference is that run's own rounding of
# every activation, measured 6.7e-3 (bfloat16) and 7.6e-4 (float16) of its float32 run; bounds
# 1.5e-2 and 2e-3. The model is closer to the exact product than the 16-bit reference is.
SIXTEEN_BIT_BOUNDS = {torch.bfloat16: (3e-3, 1.5e-2), torch.float16: (5e-4, 2e-3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_base_is_served_in_16_bit_and_matches_transformers(tmp_path, dtype):
    directory = _cast(family_dir() / "base", tmp_path / "base", dtype)
    model = MultiExpertModel(directory, {}, kv_cache_bytes=1 << 20, block_size=4)
    # Held in 16 bit: every matrix, and the cache; only the small one-dimensional tensors widened.
    assert model.dtype == dtype and model.cache.dtype == dtype and model.cache.keys[0].dtype == dtype
    matrices = [tensor for tensor in model.base.values() if tensor.dim() == 2]
    assert matrices and all(tensor.dtype == dtype for tensor in matrices)
    assert all(tensor.dtype == torch.float32 for tensor in model.base.values() if tensor.dim() == 1)
    stored = sum(info["nbytes"] for info in map(open_checkpoint(directory).info, open_checkpoint(directory)))
    held = sum(tensor.numel() * tensor.element_size() for tensor in model.base.values())
    assert held < 1.01 * stored  # no float32 copy of the matrices
    tokens = list(range(5, 40))
    ours = _chunked_run(model, tokens, [9, 10, 11, 12, 13])
    to_float32, to_16_bit = SIXTEEN_BIT_BOUNDS[dtype]
    with torch.no_grad():
        exact = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(
            input_ids=torch.tensor([tokens])).logits[0]
        sixteen = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)(
            input_ids=torch.tensor([tokens])).logits[0].float()
    scale = exact.abs().max()
    assert ((ours - exact).abs().max() / scale).item() < to_float32
    assert ((ours - sixteen).abs().max() / scale).item() < to_16_bit
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.95


def test_float32_on_request_matches_transformers_in_float32(tmp_path):
    """dtype=torch.float32 over the float16 bundled base: matrices and cache in float32, the same
    weights as transformers loads them in float32; only summation order differs (bound as for
    the float32 architectures above)."""
    base = family_dir() / "base"
    model = MultiExpertModel(base, {}, kv_cache_bytes=1 << 20, block_size=4, dtype=torch.float32)
    assert model.cache.dtype == torch.float32 and all(t.dtype == torch.float32 for t in model.base.values())
    tokens = list(range(5, 40))
    ours = _chunked_run(model, tokens, [9, 10, 11])
    reference = _reference_logits(base, tokens)
    assert ((ours - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_dtype_choices_and_refusals(tmp_path):
    base = family_dir() / "base"
    assert MultiExpertModel(base, {}, kv_cache_bytes=1 << 20).dtype == torch.float16  # the bundled base's own
    assert MultiExpertModel(base, {}, kv_cache_bytes=1 << 20, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be 'auto'.*got 'int8'"):
        MultiExpertModel(base, {}, dtype="int8")
    with pytest.raises(ValueError, match="dtype must be 'auto'.*got torch.float64"):
        MultiExpertModel(base, {}, dtype=torch.float64)
    # Matrices stored in two dtypes: 'auto' cannot choose, and says which tensors differ.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(base / "config.json", mixed / "config.json")
    checkpoint = open_checkpoint(base)
    tensors = {name: np.array(checkpoint.get_array(name)) for name in checkpoint}
    tensors["lm_head.weight"] = tensors["lm_head.weight"].astype(np.float32)
    save_file(tensors, mixed / "model.safetensors")
    with pytest.raises(ValueError, match=r"F16 \(.*\), F32 \(lm_head.weight\): give the dtype explicitly"):
        MultiExpertModel(mixed, {})
    assert MultiExpertModel(mixed, {}, kv_cache_bytes=1 << 20, dtype="float16").base["lm_head.weight"].dtype == \
        torch.float16


@pytest.mark.parametrize("dtype, size", [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)])
def test_kv_block_bytes_count_the_real_element_size(dtype, size):
    cache = PagedKVCache(num_layers=3, kv_heads=2, head_dim=8, budget_bytes=1 << 16, block_size=4, dtype=dtype)
    assert cache.block_bytes == 2 * 3 * 4 * 2 * 8 * size  # keys and values, layers, tokens, heads, channels
    assert cache.num_blocks == (1 << 16) // cache.block_bytes
    held = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert held == cache.num_blocks * cache.block_bytes  # what is counted is what is allocated
    with pytest.raises(ValueError, match="KV cache dtype must be.*got torch.int8"):
        PagedKVCache(1, 1, 8, budget_bytes=1 << 16, dtype=torch.int8)


def test_the_model_cache_holds_twice_the_blocks_in_16_bit():
    base = family_dir() / "base"
    full = MultiExpertModel(base, {}, kv_cache_bytes=1 << 20, block_size=16, dtype=torch.float32)
    sixteen = MultiExpertModel(base, {}, kv_cache_bytes=full.cache.num_blocks * full.cache.block_bytes, block_size=16)
    config = sixteen.config
    assert sixteen.cache.block_bytes == 2 * config.num_layers * 16 * config.num_kv_heads * config.head_dim * 2
    assert full.cache.block_bytes == 2 * sixteen.cache.block_bytes
    assert sixteen.cache.num_blocks == 2 * full.cache.num_blocks


def _fill(cache: PagedKVCache, sequence, count: int, generator: torch.Generator) -> torch.Tensor:
    """Grow ``sequence`` by ``count`` tokens of random keys and values in every layer; their slots."""
    start = cache.length(sequence)
    cache.reserve({sequence: count})
    slots = cache.slots(sequence, start, start + count)
    shape = (count, cache.keys[0].shape[2], cache.keys[0].shape[3])
    for layer in range(len(cache.keys)):
        cache.write(layer, slots, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    return slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_batched_attention_matches_the_per_sequence_reference(dtype, window, block_size):
    """A ragged step: decodes over long and short histories, a fresh prefill longer than the window,
    a prefill chunk continuing a cached prefix, widths that share a class (3 and 4) and one alone
    (9); grouped-query heads (8 query heads over 2). Both compute in float32 from the same cache,
    so they differ only in summation order: bound 1e-5 (measured under 1e-6)."""
    generator = torch.Generator().manual_seed(block_size * 31 + (window or 0))
    cache = PagedKVCache(2, 2, 16, budget_bytes=1 << 22, block_size=block_size, dtype=dtype)
    history = {"decode-long": 23, "decode-short": 1, "prefill": 0, "chunk": 6, "three": 2, "four": 0}
    counts = {"decode-long": 1, "decode-short": 1, "prefill": 9, "chunk": 4, "three": 3, "four": 4}
    for sequence, length in history.items():
        if length:
            _fill(cache, sequence, length, generator)
    order = ["prefill", "decode-long", "chunk", "three", "decode-short", "four"]
    starts = [cache.length(sequence) for sequence in order]
    for sequence in order:
        _fill(cache, sequence, counts[sequence], generator)
    sizes = [counts[sequence] for sequence in order]
    queries = torch.randn(sum(sizes), 8, 16, generator=generator)
    batch = AttentionBatch.build(cache, order, starts, sizes)
    assert len(batch.classes) == 3  # width classes: the two decodes; the widths 3, 4, 4; the 9 alone
    every_slot = [cache.slots(sequence, 0, start + size) for sequence, start, size in zip(order, starts, sizes)]
    for layer in range(2):
        ours = paged_attention(queries, cache, layer, batch, window=window)
        expected = reference_paged_attention(queries, cache, layer, every_slot, starts, sizes, window=window)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_the_serve_dtype_reaches_the_model(capsys):
    """``meswitch serve --dtype`` takes the names of DTYPE_NAMES and 'auto' and refuses others
    before anything loads; open_service (what it calls) builds the model in the dtype given."""
    from meswitch.cli import main
    from meswitch.serve.server.launch import open_service

    assert main(["serve", "--dtype", "float64"]) == 2
    assert "--dtype: invalid choice: 'float64' (choose from 'auto', 'float16', 'bfloat16', 'float32')" in \
        capsys.readouterr().err
    service = open_service(family_dir() / "base", [], kv_cache_bytes=1 << 20, dtype="bfloat16", report=lambda line: None)
    try:
        assert service.model.dtype == torch.bfloat16 and service.model.cache.dtype == torch.bfloat16
    finally:
        service.close()
