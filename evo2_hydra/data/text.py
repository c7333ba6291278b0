"""The text policy: which characters a sequence may hold, and how text becomes model input.

One policy decides it for every path a sequence takes, so training and inference never disagree:

    policy = TextPolicy.from_data(run.data)          # data.alphabet, data.charset, data.to_upper
    text = policy.normalize(text, where)             # preprocess: checked, case kept
    text = policy.normalize(text, where, model=True) # score/generate/embed: checked, upper-cased

- `data.charset` says what a sequence is expected to hold: `printable` (ASCII 32..126: bases, N,
  IUPAC codes, phylogenetic tags) or `iupac` (A C G T U N and the IUPAC ambiguity codes
  R Y S W K M B D H V, either case). Control bytes (0..31, 127) and non-ASCII characters are outside
  both: byte 0 is the EOD token and byte 1 PAD, and the others never occur in Evo 2's data.
- `data.alphabet` says what happens to a sequence holding anything else: `error` (one line naming
  the file, line/record and character; exit 2), `skip` (the record is left out and counted) or
  `keep` (its bytes become tokens as they are, counted). Bytes 0 and 1 are refused even with
  `keep`: they would silently turn into the EOD and PAD special tokens.
- Case: the stored tokens keep the input's case (lowercase labels are weighted in the loss,
  `data.lowercase_weight`); model inputs are upper-cased whenever the run trains with
  `data.to_upper` other than `none`, because that is what the model saw in training (savanna's
  `to_upper`, `savanna/training.py`). Inference reads the policy back from the run's saved config
  (`policy_for_checkpoint`), so a lowercase sequence scores as it would have been trained.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from evo2_hydra.config import Alphabet, Charset, DataConfig, ToUpper
from evo2_hydra.errors import UserError

log = logging.getLogger("evo2_hydra.data")

PRINTABLE = bytes(range(32, 127))
IUPAC = b"ACGTUNRYSWKMBDHVacgtunryswkmbdhv"
SPECIAL = {0: "the EOD token", 1: "the PAD token"}  # byte values that are special token ids
ALLOWED = {Charset.printable: PRINTABLE, Charset.iupac: IUPAC}


def describe_char(char: str) -> str:
    r"""'é' (U+00E9), '\x00' (byte 0 = the EOD token), ..."""
    code = ord(char)
    name = unicodedata.name(char, "") or ("control byte" if code < 128 else f"U+{code:04X}")
    special = f" = {SPECIAL[code]}" if code in SPECIAL else ""
    return f"{char!r} ({name}, code {code}{special})"


@dataclass(frozen=True)
class TextPolicy:
    """The text policy a run trained with: alphabet, charset and upper-casing."""

    alphabet: Alphabet = Alphabet.error
    charset: Charset = Charset.printable
    upper: bool = True  # model inputs are upper-cased (the run trained with data.to_upper != none)

    @classmethod
    def from_data(cls, data: DataConfig) -> TextPolicy:
        return cls(data.alphabet, data.charset, data.to_upper != ToUpper.none)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alphabet"], d["charset"] = self.alphabet.value, self.charset.value
        return d

    # ---------------------------------------------------------------- checks

    def accepts(self, text: str) -> bool:
        """True when every character of `text` is in the charset (a few C-level passes)."""
        if not text.isascii():
            return False
        if self.charset == Charset.printable:
            return text.isprintable()  # for ASCII exactly the bytes 32..126
        return not text.encode("ascii").translate(None, IUPAC)

    def problem(self, text: str) -> str | None:
        """What is unexpected in `text` (the first such character and how many), or None."""
        if self.accepts(text):
            return None
        allowed = ALLOWED[self.charset]
        bad = [i for i, c in enumerate(text) if ord(c) > 127 or ord(c) not in allowed]
        expected = (
            "printable ASCII (data.charset=printable)"
            if self.charset == Charset.printable
            else "A C G T U N or an IUPAC code (data.charset=iupac)"
        )
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return (
            f"character {describe_char(text[bad[0]])} at position {bad[0]}{more}; "
            f"expected {expected}"
        )

    def verdict(self, text: str) -> tuple[str, str | None]:
        """("ok" | "skip" | "keep" | "error", what is wrong) for `text` under this policy."""
        problem = self.problem(text)
        if problem is None:
            return "ok", None
        if self.alphabet == Alphabet.skip:
            return "skip", problem
        if self.alphabet == Alphabet.keep and "\x00" not in text and "\x01" not in text:
            return "keep", problem
        hint = (
            "bytes 0 and 1 are the EOD and PAD tokens and are never kept"
            if self.alphabet == Alphabet.keep
            else "data.alphabet=skip leaves such records out, =keep keeps them"
        )
        return "error", f"{problem} ({hint})"

    def normalize(self, text: str, where: str, *, model: bool = False) -> str | None:
        """`text` checked against the policy; None when the record is to be skipped.

        `model=True` gives model input (upper-cased when the run trained upper-cased); otherwise
        the case is kept (what preprocessing stores). Raises UserError naming `where`.
        """
        action, problem = self.verdict(text)
        if action == "error":
            raise UserError(f"{where}: {problem}")
        if action == "skip":
            return None
        if model and self.upper:
            return upper_ascii(text)
        return text


def upper_ascii(text: str) -> str:
    """a-z -> A-Z and nothing else (str.upper would also change non-ASCII letters, e.g. ß -> SS,
    which changes the length; training upper-cases token ids 97..122 only).
    """
    if text.isascii():
        return text.upper()
    return text.translate(_ASCII_UPPER)


_ASCII_UPPER = {c: c - 32 for c in range(ord("a"), ord("z") + 1)}


def upper_ids(ids: list[int]) -> list[int]:
    """Token ids 97..122 (a-z) -> 65..90, as training's `to_upper` does to every input token."""
    return [i - 32 if 97 <= i <= 122 else i for i in ids]


# ------------------------------------------------------------------------- policy of a checkpoint


def _saved_data_section(ckpt_path: str) -> tuple[dict | None, Path | None]:
    """The `data` section of the run config saved with one of our checkpoints, if any (read by
    the checkpoint package's safe reader: size limit, no YAML aliases).
    """
    from evo2_hydra.checkpoint import locate_checkpoint
    from evo2_hydra.checkpoint.run_dir import read_saved_run

    saved = read_saved_run(locate_checkpoint(ckpt_path))
    if saved is None:
        return None, None
    return saved.section("data"), saved.config_path


def policy_for_checkpoint(ckpt_path: str | None, data: DataConfig) -> tuple[TextPolicy, str]:
    """The text policy the checkpoint's run trained with, and where it came from.

    Our runs save their config (data.alphabet, data.charset, data.to_upper) with every checkpoint;
    other files (savanna, vortex) take the command line's `data.*` (default: upper-cased, as Evo 2
    trained). A saved value that is not a valid choice is an error naming the file.
    """
    policy = TextPolicy.from_data(data)
    if not ckpt_path:
        return policy, "the command line"
    saved, path = _saved_data_section(ckpt_path)
    if saved is None:
        return policy, "the command line"
    try:
        to_upper = ToUpper(saved.get("to_upper", ToUpper.normalized_weighted.value))
        alphabet = Alphabet(saved.get("alphabet", policy.alphabet.value))
        charset = Charset(saved.get("charset", policy.charset.value))
    except ValueError as err:
        raise UserError(f"{path}: data section: {err}") from None
    saved_policy = TextPolicy(alphabet, charset, to_upper != ToUpper.none)
    if saved_policy != policy:
        log.info("text policy from the run (%s): %s", path, saved_policy.to_dict())
    return saved_policy, str(path)
