"""Label normalisation, tokenisation and prompt choice (OSUM reference §5)."""

from __future__ import annotations

import re
from pathlib import Path

from osum_torch_infer.contract import DEFAULT_TASK, normalize_task  # noqa: F401 (re-exported)
from osum_torch_infer.files import atomic_file
from osum_torch_infer.formats import prompts as prompt_book
from osum_torch_infer.formats.prompts import NO_PROMPT  # noqa: F401 (re-exported)

DEFAULT_PROMPTS = Path(__file__).with_name("prompts_default.yaml")

_CJK = "\u4e00-\u9fff"
_SPACE_AROUND_CJK = re.compile(rf"\s*([{_CJK}])\s*")
_SPACE_AROUND_ANGLE = re.compile(r"\s*([<>])\s*")


# OSUM's processor (global_style_dict): raw style tags of the data -> the 8 style classes the model learns; applied
# to labels of tasks with <STYLE>, to exact ``<tag>`` matches only
STYLE_MAP = {
    "朗读": "新闻科普", "科普百科": "新闻科普", "悬疑恐怖": "恐怖故事", "童话故事": "童话故事", "客服": "客服",
    "诗歌": "诗歌散文", "散文": "诗歌散文", "武侠评书": "有声书", "小说": "有声书", "历史": "有声书", "科幻": "有声书",
    "对话": "日常口语", "口语": "日常口语", "幽默": "其他", "其他": "其他",
}
_TAG = re.compile(r"<([^<>]+)>")


def remap_style(label: str) -> str:
    """``"...<小说>"`` -> ``"...<有声书>"``: OSUM's style remapping (other tags are left alone)."""
    return _TAG.sub(lambda m: f"<{STYLE_MAP.get(m.group(1), m.group(1))}>", label)


def normalize_label(text: str) -> str:
    """OSUM's ``process_text``: drop spaces around CJK chars, lowercase everything, no spaces around < >."""
    text = _SPACE_AROUND_CJK.sub(r"\1", text)
    text = text.lower()
    return _SPACE_AROUND_ANGLE.sub(r"\1", text).strip()


class Tokenizer:
    """A Hugging Face fast tokenizer loaded from a local directory (``tokenizer.json``), no hub access.

    ``encode`` is ``tokenize`` + ``convert_tokens_to_ids`` without special tokens, as OSUM's data side does.
    """

    def __init__(self, directory: str | Path, eod_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as _Tok

        path = Path(directory)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory} (a local Hugging Face tokenizer directory "
                                    f"is needed; hub names cannot be downloaded)")
        self.path = str(file)
        self._tok = _Tok.from_file(self.path)
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer {file} has no end-of-text token {eod_token!r} (data.eod_token)")
        self.eod_id = int(eod)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __getstate__(self):  # picklable for Grain worker processes
        return {"path": self.path, "eod_id": self.eod_id, "vocab_size": self.vocab_size}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as _Tok

        self.__dict__.update(state)
        self._tok = _Tok.from_file(self.path)


class PromptBook:
    """Prompts per task key, in OSUM's ``prompt_config.yaml`` format ``{task: [prompt, ...]}``: the format is read
    and the prompt picked by :mod:`osum_torch_infer.formats.prompts` (the runtime reads a package's book with it)."""

    def __init__(self, prompts: dict[str, list[str]], source: str = "<dict>"):
        self.prompts: dict[str, list[str]] = prompt_book.parse_book(prompts, source)
        self.source = source

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PromptBook":
        path = Path(path) if path else DEFAULT_PROMPTS
        return cls(prompt_book.load_book(path), str(path))

    @property
    def tasks(self) -> list[str]:
        return sorted(self.prompts)

    def check_tasks(self, tasks) -> None:
        """Raise at start-up if the corpus uses tasks this prompt file does not know."""
        unknown = prompt_book.unknown_tasks(self.prompts, tasks)
        if unknown:
            raise ValueError(f"tasks {unknown} are used by the data but missing from the prompt file {self.source}; "
                             f"known tasks: {self.tasks}")

    def choose(self, task: str, seed: int, epoch: int, index: int) -> str:
        """A prompt for ``task``, random but a pure function of ``(seed, epoch, index)``."""
        return prompt_book.choose(self.prompts, task, seed, epoch, index)


def train_bpe_tokenizer(texts, out_dir: str | Path, vocab_size: int = 400,
                        eod_token: str = "<|endoftext|>", added_tokens=()) -> Path:
    """Train a byte-level BPE tokenizer (Qwen2's kind, at toy size) on ``texts``; write ``out_dir/tokenizer.json``.

    ``added_tokens`` (e.g. tags such as ``<MALE>``) become single, non-special tokens: matched before BPE,
    kept by decoding. For demos and tests, where no hub tokenizer can be downloaded. Deterministic for the same
    texts.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    if added_tokens:
        tok.add_tokens(list(added_tokens))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    return out
