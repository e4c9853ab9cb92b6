"""Text <-> token ids for a model, from GGUF metadata or a Hugging Face tokenizer folder.

Everything runs on the Rust `tokenizers` library; this module only translates what a model file says
(llama.cpp's vocabulary conventions, or tokenizer.json + tokenizer_config.json) into one of its
pipelines, so that ids equal what llama.cpp / transformers produce for the same file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ingot.errors import FormatError, UnsupportedError

# GGUF token_type values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in common chat formats; a generation stops on any the vocabulary has.
# (llama.cpp's end-of-generation list; it also treats them as control tokens whatever their type.)
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                "<|end|>", "<|return|>", "<|call|>", "<EOT>", "<end_of_utterance>")

# The pre-tokenizer regexes llama.cpp applies for each `tokenizer.ggml.pre` (llama-vocab.cpp). They run
# in sequence: each regex splits every piece the previous ones left, keeping matches and gaps alike.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_REGEXES = {
    "gpt-2": [_GPT2],
    "gpt2": [_GPT2],  # not a llama.cpp name (it has "gpt-2"); kept for files written with it
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "llama-bpe": [_LLAMA3],
    "dbrx": [_LLAMA3],
    "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
    "stablelm2": [_QWEN2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2],
    "mpt": [_GPT2],
    "olmo": [_GPT2],
}
# llama.cpp takes a whole pre-token as one id when the vocabulary has it, before any merge.
_IGNORE_MERGES = {"llama3", "llama-bpe"}


class Tokenizer:
    """encode/decode plus the special ids a generator needs. Build with from_gguf or from_hf_dir."""

    def __init__(self, hf: HFTokenizer, *, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 add_eos: bool = False, chat_template: str | None = None, extra_stop_ids=(), kind: str = ""):
        self._hf = hf
        self.kind = kind  # where the vocabulary came from, for `ingot inspect`
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.add_eos = add_eos and eos_id is not None
        self.chat_template = chat_template
        stops = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        stops.update(i for i in map(self.token_to_id, _END_OF_TURN) if i is not None)
        self.stop_ids = frozenset(stops)

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, meta: dict) -> "Tokenizer":
        """From read_metadata() of a GGUF file: `tokenizer.ggml.*` keys."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise FormatError("GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
        types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            hf = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
            default_bos = False  # llama.cpp: BPE vocabularies add BOS only when the file says so
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None:
                raise FormatError("GGUF 'llama' tokenizer has no tokenizer.ggml.scores")
            hf = _sentencepiece_bpe(tokens, scores, types, bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                    meta.get("tokenizer.ggml.unknown_token_id"))
            default_bos = True
        else:
            raise UnsupportedError(f"tokenizer model '{kind}' is not supported (gpt2 and llama are)")
        _add_special_tokens(hf, tokens, types)
        extra = [meta.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        return cls(hf, bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), extra_stop_ids=extra,
                   kind=f"GGUF {kind} (pre-tokenizer {meta.get('tokenizer.ggml.pre', 'default')})")

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """From a folder with tokenizer.json and (optionally) tokenizer_config.json / generation_config.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FormatError(f"{path}: no tokenizer.json")
        hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        bos_id = hf.token_to_id(_token_text(config.get("bos_token")) or "")
        eos_id = hf.token_to_id(_token_text(config.get("eos_token")) or "")
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # no explicit flag: do what tokenizer.json's post-processor does
            probe = hf.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and probe[:1] == [bos_id]
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(hf, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                   add_eos=bool(config.get("add_eos_token", False)), chat_template=template, extra_stop_ids=extra,
                   kind="tokenizer.json")

    def to_dict(self) -> dict:
        """Everything from_dict needs to rebuild this tokenizer (tokenizer.json as text; no chat template,
        which a .ingot header keeps beside it)."""
        return {"tokenizer_json": self._hf.to_str(), "bos_id": self.bos_id, "eos_id": self.eos_id,
                "add_bos": self.add_bos, "add_eos": self.add_eos, "stop_ids": sorted(self.stop_ids), "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict, chat_template: str | None = None) -> "Tokenizer":
        return cls(HFTokenizer.from_str(d["tokenizer_json"]), bos_id=d["bos_id"], eos_id=d["eos_id"],
                   add_bos=d["add_bos"], add_eos=d["add_eos"], chat_template=chat_template,
                   extra_stop_ids=d["stop_ids"], kind=d["kind"])

    # ---- use -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for text; special-token strings in it (e.g. <|im_start|>) become their single ids."""
        # BOS/EOS are added here rather than by a post-processor so both constructors behave alike.
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental decode for generation: push ids one by one, get text as soon as it is whole.

    A token may end inside a multi-byte character (byte-level BPE, byte fallback); its decode then ends
    in U+FFFD and nothing is emitted until a later token completes the character. Text is always taken
    as the difference of two decodes of the same window, so decoder rules that depend on context (a
    stripped leading space, byte fusing) apply exactly as in a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted and can no longer matter
        self._read = 0  # ids[prefix:read] decode to text already emitted

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


# ---- GGUF vocabularies -> tokenizers pipelines ---------------------------------------------------


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    """GPT-2 style byte-level BPE; the pre-tokenizer regexes are llama.cpp's for `pre`."""
    pre = pre or "default"
    regexes = _PRE_REGEXES.get(pre)
    if regexes is None:
        warnings.warn(f"unknown tokenizer.ggml.pre '{pre}': using GPT-2's pre-tokenizer; ids may differ from llama.cpp")
        regexes = _PRE_REGEXES["gpt2"]
    vocab = _vocab(tokens)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise FormatError(f"GGUF merge {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    model = models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens, scores, types, add_space_prefix: bool, unk_id) -> HFTokenizer:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm) as a BPE with byte fallback.

    llama.cpp merges, among all adjacent symbol pairs whose concatenation is a vocabulary entry (of any
    type), the one whose entry has the highest score. A BPE whose merge list holds every split of every
    entry into two entries, ranked by that entry's score, makes the same choices.
    """
    vocab = _vocab(tokens)
    rows, ks = _two_entry_splits(tokens)
    # Highest score first; among equal scores the lower id (llama.cpp would take the leftmost pair,
    # which no fixed rank can express; equal scores occur only among control/byte entries).
    order = np.lexsort((rows, -np.asarray(scores, dtype=np.float64)[rows]))
    pairs = [(tokens[i][:k], tokens[i][k:]) for i, k in zip(rows[order].tolist(), ks[order].tolist())]
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    hf = HFTokenizer(models.BPE(vocab, pairs, unk_token=unk, byte_fallback=True, fuse_unk=False))
    # llama.cpp escapes spaces as U+2581 and (optionally) prefixes each text run with one; the
    # normalizer runs per text run between special tokens, just as llama.cpp's prefix does.
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    return hf


_HASH_MUL = 0x100000001B3  # odd, hence invertible mod 2**64: a suffix's hash follows from two prefix hashes


def _two_entry_splits(tokens: list[str]):
    """(row, k) for every entry tokens[row] whose tokens[row][:k] and tokens[row][k:] are entries too.

    A Python loop over the ~1.5M split points of a 262k vocabulary takes seconds, so this hashes all
    prefixes at once with numpy (polynomial hash mod 2**64; a 64-bit collision is ~1e-8 likely here).
    """
    n = len(tokens)
    lens = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
    chars = np.array(tokens, dtype=str)
    width = max(chars.dtype.itemsize // 4, 1)
    with np.errstate(over="ignore"):  # uint64 wrap-around is the modulus
        h = chars.view(np.uint32).reshape(n, width).astype(np.uint64)
        h += np.uint64(1)  # so NUL characters still count
        h *= np.uint64(_HASH_MUL) ** np.arange(width, dtype=np.uint64)
        h[np.arange(width) >= lens[:, None]] = 0
        prefix = np.cumsum(h, axis=1, dtype=np.uint64, out=h)  # prefix[r, j]: hash of tokens[r][:j + 1]
        full = prefix[np.arange(n), np.maximum(lens - 1, 0)]
        rows, cols = np.nonzero(np.arange(1, width + 1) < lens[:, None])
        ks = cols + 1
        head = prefix[rows, cols]
        tail = (full[rows] - head) * np.uint64(pow(_HASH_MUL, -1, 1 << 64)) ** ks.astype(np.uint64)
    # A 16M-bit table of hash prefixes drops most candidates before the exact (sorted) lookup.
    seen = np.zeros(1 << 24, dtype=bool)
    seen[full >> np.uint64(40)] = True
    keep = np.nonzero(seen[head >> np.uint64(40)] & seen[tail >> np.uint64(40)])[0]
    rows, ks, head, tail = rows[keep], ks[keep], head[keep], tail[keep]
    known = np.sort(full)

    def member(x):
        i = np.minimum(np.searchsorted(known, x), n - 1)
        return known[i] == x

    ok = member(head) & member(tail)
    return rows[ok], ks[ok]


def _add_special_tokens(hf: HFTokenizer, tokens, types) -> None:
    """Control and user-defined entries are matched whole in the raw text, before any other step.

    Control tokens (<bos>, <|im_start|>, <start_of_turn>) are 'special': decode can skip them.
    User-defined ones (Gemma's whitespace runs, <table>) are ordinary text that is never split.
    """
    control = [AddedToken(tok, special=True, normalized=False)
               for tok, t in zip(tokens, types) if tok and (t == _CONTROL or tok in _END_OF_TURN)]
    user = [AddedToken(tok, special=False, normalized=False)
            for tok, t in zip(tokens, types) if tok and t == _USER_DEFINED and tok not in _END_OF_TURN]
    hf.add_special_tokens(control)
    hf.add_tokens(user)


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab[tok or f"[EMPTY_{i}]"] = i  # llama.cpp's name for an empty entry
    if len(vocab) != len(tokens):  # llama.cpp refuses such a file too
        raise FormatError("GGUF tokenizer has duplicate tokens")
    return vocab


# ---- tokenizer_config.json helpers ---------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value
