"""Activation statistics for activation-aware salient channels, step sizes and GPTQ.

A forward pre-hook on every ``nn.Linear`` of the expert accumulates, over the
calibration tokens, either the second moment ``E[x_i^2]`` of each input channel (the
weight the paper's error ``sum_tokens ||x_i * (D - Q(D))[:, i]||^2`` puts on column
``i``: all the round-to-nearest quantizer needs) or the whole second-moment matrix
``H = E[x x^T]`` of the input, which the error-compensating quantizer
(``include/meswitch/gptq.hpp``) needs; its diagonal is ``E[x_i^2]``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def read_calibration_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts from a ``.jsonl`` file (field ``text``, or ``question`` + ``answer``) or a plain text file
    (blank-line separated)."""
    from meswitch.inputs import read_jsonl_records, read_text, string_field

    path = Path(path)
    raw = read_text(path)
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for number, record in read_jsonl_records(path, raw):
            if "text" in record:
                texts.append(string_field(record, "text", path, number))
            elif "question" in record and "answer" in record:
                texts.append(f"{string_field(record, 'question', path, number)}\n"
                             f"{string_field(record, 'answer', path, number)}")
            else:
                raise ValueError(f"{path}:{number}: missing field 'text' (or 'question' and 'answer')")
    else:
        texts = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not texts:
        raise ValueError(f"{path}: no calibration text found")
    return texts[:limit] if limit else texts


def token_sequences(tokenizer, texts: Sequence[str], max_length: int, what: str) -> list:
    """Each text as a 1-D ``torch`` id tensor: BOS (else EOS) then at most ``max_length - 1`` tokens.

    Texts shorter than two tokens are dropped; none left is a ValueError naming ``what``.
    """
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequences = [torch.tensor([start] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1])
                 for t in texts]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise ValueError(f"{what}: every calibration text is empty after tokenization")
    return sequences


def calibration_ids(tokenizer, texts: Sequence[str], max_length: int, max_tokens: int):
    """The ``[1, T]`` id tensors calibration runs on: each text truncated to ``max_length``, in order, until
    ``max_tokens`` tokens have been seen (the text that crosses it included)."""
    seen = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] == 0:
            continue
        yield ids
        seen += ids.shape[1]
        if seen >= max_tokens:
            break


def _run_calibration(model, tokenizer, texts: Sequence[str], max_length: int, max_tokens: int, hook_for) -> None:
    """Run ``model`` on ``texts`` with ``hook_for(weight name)`` as a pre-hook on every ``nn.Linear``."""
    import torch

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(hook_for(module_name + ".weight")))
    try:
        model.eval()
        with torch.no_grad():
            for ids in calibration_ids(tokenizer, texts, max_length, max_tokens):
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()


class _SharedInputSums:
    """``sum x^T x`` per distinct linear input, the linears that read the same tensor sharing one.

    A forward pre-hook per linear; consecutive linears called on the same input tensor
    object (the attention projections, the gate and up projections) share the first
    one's accumulator. Accumulation is in float64.
    """

    def __init__(self) -> None:
        self.sums: dict[str, object] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # weight -> the weight whose accumulator it shares
        self._last: tuple[object, str] | None = None

    def hook_for(self, name: str):
        def hook(_module, inputs):
            if self._last is not None and self._last[0] is inputs[0]:
                self.owner.setdefault(name, self.owner[self._last[1]])
                return
            self.owner.setdefault(name, name)
            self._last = (inputs[0], name)
            self.add(self.owner[name], inputs[0])
        return hook

    def add(self, key: str, inputs) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        if key in self.sums:
            self.sums[key].addmm_(x.T, x)  # in place: no [cols, cols] temporaries (1.6 GB each at 14336)
        else:
            self.sums[key] = x.T @ x
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def take(self, key: str) -> np.ndarray:
        """``E[x x^T]`` of ``key`` in float32; its accumulator is freed."""
        total = self.sums.pop(key)
        return total.div_(self.counts[key]).float().numpy()


def collect_input_hessians(model, tokenizer, texts: Sequence[str], max_length: int = 256,
                           max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """``{weight name: E[x x^T] of its input (float32 [cols, cols])}`` for every ``nn.Linear`` of ``model``.

    Linears that read the same input tensor (the attention projections, the gate and up
    projections) share one accumulator and one returned array, so a layer holds one
    matrix per distinct input. Accumulation is in float64.

    Parameters
    ----------
    model
        A transformers causal LM (evaluated in float32 on CPU).
    tokenizer
        Its tokenizer.
    texts
        Calibration texts; tokenised one by one, truncated to ``max_length``.
    max_tokens
        Stop after this many tokens.
    """
    accumulators = _SharedInputSums()
    _run_calibration(model, tokenizer, texts, max_length, max_tokens, accumulators.hook_for)
    arrays = {key: accumulators.take(key) for key in list(accumulators.sums)}
    return {name: arrays[key] for name, key in accumulators.owner.items()}


def collect_channel_second_moments(model, tokenizer, texts: Sequence[str], max_length: int = 256,
                                   max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """``{weight name: E[x^2] per input channel (float32)}`` for every ``nn.Linear`` of ``model``.

    The parameters are those of :func:`collect_input_hessians`; this keeps one float per
    input channel instead of a ``[cols, cols]`` matrix.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            squared = (x * x).sum(dim=0, dtype=torch.float64)
            sums[name] = squared if name not in sums else sums[name] + squared
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    _run_calibration(model, tokenizer, texts, max_length, max_tokens, hook_for)
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


class HessianFiles(Mapping):
    """Calibration Hessians spilled to ``.npy`` files, each opened memory-mapped when asked for.

    What :func:`stream_input_hessians` returns: ``{weight name: float32 [cols, cols]}``
    like :func:`collect_input_hessians`, but only the pages a reader touches are in
    memory. Linears that share an input share one file. ``close`` removes the directory.
    """

    def __init__(self, directory: Path, files: dict[str, str]) -> None:
        self.directory = Path(directory)
        self._files = files

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self.path(name), mmap_mode="r")

    def path(self, name: str) -> Path:
        """The ``.npy`` file holding the Hessian of ``name``."""
        return self.directory / self._files[name]

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def add(self, array: np.ndarray, names: Sequence[str]) -> None:
        """Write ``array`` (float32) as the Hessian of every weight in ``names``: one file, temp file then rename."""
        file = f"{len(set(self._files.values())):05d}.npy"
        temporary = self.directory / (file + ".tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, np.asarray(array, dtype=np.float32))
        os.replace(temporary, self.directory / file)
        self._files.update({name: file for name in names})

    def nbytes(self) -> int:
        """Bytes on disk (each shared file once)."""
        return sum((self.directory / f).stat().st_size for f in set(self._files.values()))

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _LayerInput(Exception):
    """Raised by the pre-hook on the first decoder layer: the forward has gone far enough."""

    def __init__(self, args, kwargs) -> None:
        super().__init__("first decoder layer reached")
        self.args, self.kwargs = args, kwargs


def _decoder_stack(model):
    """``(layers, final norm, output linear)`` of a decoder-only transformers model whose only linears
    outside the layers is the output layer (Llama, Mistral, Qwen2, ...), else ``None``."""
    import torch

    inner = getattr(model, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0 or norm is None \
            or not isinstance(head, torch.nn.Linear):
        return None
    inside = {id(m) for layer in layers for m in layer.modules()}
    outside = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in inside]
    return (layers, norm, head) if outside == [head] else None


def stream_input_hessians(model, tokenizer, texts: Sequence[str], directory: str | Path, max_length: int = 256,
                          max_tokens: int = 16384, progress: bool = False) -> HessianFiles:
    """:func:`collect_input_hessians` one decoder layer at a time, each finished Hessian written to ``directory``.

    The model runs layer by layer: the calibration texts' hidden states entering the
    first layer are captured (the forward stops there), then each layer runs on all of
    them with its linears hooked, its Hessians are written as ``.npy`` files (float32,
    temp file then rename) and freed, and its outputs become the next layer's inputs; the
    output layer's Hessian comes from the final norm of the last layer's outputs. So the
    memory held is one layer's accumulators (float64) plus the hidden states of the
    calibration tokens (``tokens x hidden`` float32, twice), not every layer's Hessians at
    once (about 2 GB per layer of a 7B model in float64). The files take float32 space on
    disk: about 1 GB per 7B layer. Same texts, same values as :func:`collect_input_hessians`
    (to float64 summation order). A model without a plain decoder stack (``model.layers``,
    ``model.norm``, one output linear) is captured whole and then written.
    """
    import torch

    files = HessianFiles(directory, {})
    files.directory.mkdir(parents=True, exist_ok=True)

    def spill(accumulators: _SharedInputSums) -> None:
        for key in list(accumulators.sums):
            files.add(accumulators.take(key), [name for name, owner in accumulators.owner.items() if owner == key])

    stack = _decoder_stack(model)
    if stack is None:
        accumulators = _SharedInputSums()
        _run_calibration(model, tokenizer, texts, max_length, max_tokens, accumulators.hook_for)
        spill(accumulators)
        return files
    layers, norm, head = stack
    module_names = {id(m): n for n, m in model.named_modules()}
    model.eval()
    with torch.no_grad():
        hidden, arguments = [], []
        def stop(_module, args, kwargs):
            raise _LayerInput(args, kwargs)

        handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for ids in calibration_ids(tokenizer, texts, max_length, max_tokens):
                try:
                    model(input_ids=ids, use_cache=False)
                except _LayerInput as reached:
                    hidden.append(reached.args[0] if reached.args else reached.kwargs.pop("hidden_states"))
                    arguments.append((reached.args[1:], reached.kwargs))
                else:
                    raise RuntimeError("calibration: the forward never reached the first decoder layer")
        finally:
            handle.remove()
        from tqdm import tqdm

        bar = tqdm(total=len(layers), desc="calibration Hessians", unit="layer", leave=False, disable=not progress)
        for layer in layers:
            accumulators = _SharedInputSums()
            handles = [m.register_forward_pre_hook(accumulators.hook_for(module_names[id(m)] + ".weight"))
                       for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            try:
                for index, (args, kwargs) in enumerate(arguments):
                    output = layer(hidden[index], *args, **kwargs)
                    hidden[index] = output[0] if isinstance(output, tuple) else output
            finally:
                for handle in handles:
                    handle.remove()
            spill(accumulators)
            del accumulators
            bar.update()
        bar.close()
        accumulators = _SharedInputSums()
        name = module_names[id(head)] + ".weight"
        accumulators.owner[name] = name
        for states in hidden:
            accumulators.add(name, norm(states))
        spill(accumulators)
    return files


def embedding_output_fisher(model, tokenizer, texts: Sequence[str], max_length: int = 256,
                            max_tokens: int = 16384) -> dict[str, np.ndarray]:
    """``{embedding weight name: E[g g^T] (float32 [hidden, hidden])}``, ``g`` the loss gradient at the
    embedding's output, per calibration token.

    The Hessian GPTQ uses for an embedding. A lookup has no input whose correlations
    could absorb an error, but its output does: a row's error ``e`` moves the
    calibration loss by about ``e^T F e / 2`` wherever the token occurs (the empirical
    Fisher ``F``), so quantizing the rows against ``F`` pushes each column's error onto
    the hidden directions the model is least sensitive to. One forward and backward pass
    per text with the gradient taken at the embedding output only (no weight gradients
    are kept). Accumulation in float64. A model whose output layer shares the embedding
    weight (tied) returns ``{}``: its error also lands on the logits, which this does not see.
    """
    import torch

    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is embedding.weight:
        return {}
    name = next(n for n, m in model.named_modules() if m is embedding) + ".weight"
    accumulators = _SharedInputSums()  # the same sum of outer products, over gradients
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        model.eval()
        for ids in calibration_ids(tokenizer, texts, max_length, max_tokens):
            if ids.shape[1] < 2:
                continue
            with torch.no_grad():
                inputs = embedding(ids)
            inputs.requires_grad_(True)
            # Summed, not averaged, over tokens: every token's gradient counts once.
            loss = model(inputs_embeds=inputs, labels=ids, use_cache=False).loss * (ids.shape[1] - 1)
            (gradient,) = torch.autograd.grad(loss, inputs)
            accumulators.add(name, gradient)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    return {name: accumulators.take(name)} if name in accumulators.sums else {}
