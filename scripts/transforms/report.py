"""Report-text transforms: tokenisation, rewriting into the training template, report dropout, rephrasing and the
side-aware flip (array/dictionary pairs)."""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import Flipd, MapTransform, RandomizableTransform, Transform

from scripts.phrasing import REPORT_TEMPLATES, clinical_phrasing
from scripts.text import resolve_text_encoder_dir
from scripts.transforms.utils import sample_name, warning_mode
from scripts.zones import report_zones

__all__ = [
    "TokenizeReport", "TokenizeReportd", "ReportToTemplate", "ReportToTemplated", "RandDropReportd", "RandSideFlipd",
    "RandRephraseReportd", "swap_sides",
]

logger = logging.getLogger(__name__)


class TokenizeReport(Transform):
    """Report text → fixed-length token ids and attention mask, with the configured encoder's fast tokenizer.

    Each distinct text is tokenised once and cached: clinical reports repeat (QaTa-COV19 has ~150 distinct
    reports for 5,713 images). An empty report gives all-padding ids and an all-zero mask, which the networks
    read as "no report".

    Args:
        tokenizer_dir: local Hugging Face model directory; None uses the bundled MiniLM.
        max_length: tokens per report after padding/truncation (24, the setting of the published methods).
        lowercase: lower-case the text first (uncased tokenizers such as MiniLM's do it anyway).
        unicode_form: Unicode normalisation applied first (``"NFKC"`` folds full-width letters, ligatures and
            non-breaking spaces); None keeps the text as it is. Runs of white space always become one space.
        cache_size: distinct texts kept tokenised (least recently used out first); report augmentation
            (:class:`RandRephraseReportd`) makes the texts many.
    """

    def __init__(
        self,
        tokenizer_dir: str | os.PathLike | None = None,
        max_length: int = 24,
        lowercase: bool = False,
        unicode_form: str | None = "NFKC",
        cache_size: int = 4096,
    ) -> None:
        self.tokenizer_dir = resolve_text_encoder_dir(tokenizer_dir)
        self.max_length = int(max_length)
        self.lowercase = lowercase
        self.unicode_form = unicode_form
        self._tokenizer = None  # loaded on first use, so the transform pickles cheaply into workers
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, use_fast=True)
        return self._tokenizer

    def normalise(self, text: str) -> str:
        """The text as it is tokenised: Unicode-normalised, white space collapsed, optionally lower-cased."""
        if self.unicode_form:
            text = unicodedata.normalize(self.unicode_form, text)
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` with the special tokens, before padding or truncation."""
        return len(self._tok()(self.normalise(text))["input_ids"])

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(ids, mask)``, both int64 tensors of length ``max_length``."""
        text = self.normalise(text)
        if text not in self._cache:
            if text:
                enc = self._tok()(
                    text, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
            else:
                pad = self._tok().pad_token_id or 0
                ids = torch.full((self.max_length,), pad, dtype=torch.long)
                mask = torch.zeros(self.max_length, dtype=torch.long)
            self._cache[text] = (ids, mask)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(text)
        ids, mask = self._cache[text]
        return ids.clone(), mask.clone()


class TokenizeReportd(MapTransform):
    """Dictionary wrapper of :class:`TokenizeReport`: writes ``<key>_ids`` and ``<key>_mask``.

    Args:
        keys: the report text key(s), usually ``"report"``.
        tokenizer: the tokenizer; the configs give every component the same one (``@tokenizer``), so reports are
            tokenised alike at load time, after a side flip and in MONAI Label. None: ``TokenizeReport()``.
        allow_missing_report: when True, a missing, None or empty report becomes "no report" (inference,
            MONAI Label); when False it raises an error naming the sample's image (training and evaluation data
            must carry their reports).
        absent_report_image_only: when True (and ``allow_missing_report`` is False), a sample with no report key
            at all becomes "no report", an image-only sample, with a warning naming it (MONAI Label trains from
            image + label datalists). A report that is present but None or empty is still an error.
        ids_suffix, mask_suffix: suffixes of the output keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        tokenizer: TokenizeReport | None = None,
        allow_missing_report: bool = False,
        ids_suffix: str = "_ids",
        mask_suffix: str = "_mask",
        absent_report_image_only: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.tokenize = tokenizer if tokenizer is not None else TokenizeReport()
        self.allow_missing_report = allow_missing_report
        self.absent_report_image_only = absent_report_image_only
        self.ids_suffix, self.mask_suffix = ids_suffix, mask_suffix
        self._absent = 0  # samples without a report key seen by this process

    named_absent = 3  # samples without a report key named one by one; the rest are counted (10, 100, 1000, ...)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            text = d.get(key)
            if key not in d and self.absent_report_image_only and not self.allow_missing_report:
                self._absent += 1
                mode = warning_mode(self._absent, self.named_absent)  # a whole split: counted, not 1,429 lines
                if mode == "name":
                    logger.warning("sample %s has no '%s' key: an image-only sample", sample_name(d), key)
                elif mode == "count":
                    logger.warning("%d samples so far have no '%s' key (image-only samples); after the first %d "
                                   "they are counted, not named", self._absent, key, self.named_absent)
                text = ""
            elif text is None or (isinstance(text, str) and not text.strip()):
                if not self.allow_missing_report:
                    state = "missing" if text is None else "empty"
                    raise ValueError(f"report '{key}' is {state} for sample {sample_name(d)}")
                text = ""
            if not isinstance(text, str):
                raise TypeError(f"report '{key}' of sample {sample_name(d)} is {type(text).__name__}, not text")
            d[key] = text  # keep the key, so batches of reported and unreported samples collate
            d[f"{key}{self.ids_suffix}"], d[f"{key}{self.mask_suffix}"] = self.tokenize(text)
        return d


class ReportToTemplate(Transform):
    """Report text → the lung zones it names, written in the template the network was trained on.

    A network trained on templated reports (QaTa-COV19's "unilateral pulmonary infection, one infected area, lower
    left lung.") keys on the template's wording: free text that names the same zones ("patchy opacity in the left
    lower zone; the right lung is clear") scores below giving no report at all (``docs/results.md``). This
    transform reads the zones with the negation-aware parser :func:`scripts.zones.report_zones` and writes them
    with :data:`scripts.phrasing.REPORT_TEMPLATES` ``[template]``, so that the network sees the wording it learned.
    A report already in the template passes as it is.
    Left and right keep the meaning they have in the text (the dataset's convention).

    What it cannot do is what the parser cannot: a location it does not know, or a sentence whose negation it
    misreads, gives wrong or no zones (its accuracy on hand-written sentences: ``docs/results.md``). A report
    that names no lung zone cannot be written in the template; it is logged (the first ``named_unparsed`` with
    their text, then counted) and becomes ``""``, the network's no-report path, when ``unparsed="drop"``, or
    stays as written with ``"keep"``. ``rewritten`` and ``unparsed_count`` count both cases (per process: each
    data-loader worker counts its own). An empty report stays empty.

    Args:
        template: a name in :data:`scripts.phrasing.REPORT_TEMPLATES` (``"qata"``); ``"none"`` or None: reports
            pass as written (a network trained on free text, or on reports that name no lung zones, such as
            MoNuSeg's). ``"none"`` is the one to give on the command line: ``monai.bundle run`` drops an override
            whose value is None without a word.
        unparsed: ``"drop"`` or ``"keep"``, for a report that names no lung zone.
    """

    named_unparsed = 3

    def __init__(self, template: str | None = "qata", unparsed: str = "drop") -> None:
        template = None if template == "none" else template
        if template is not None and template not in REPORT_TEMPLATES:
            raise ValueError(f"report template {template!r} is not one of {sorted(REPORT_TEMPLATES)} or 'none'")
        if unparsed not in ("drop", "keep"):
            raise ValueError(f"unparsed must be 'drop' or 'keep', not {unparsed!r}")
        self.template, self.unparsed = template, unparsed
        self.rewritten = self.unparsed_count = 0

    def __call__(self, text: str, source: str = "a report") -> str:
        """``text`` in the template; ``source`` names it in the log (a sample id, "the MONAI Label request")."""
        if self.template is None or not text.strip():
            return text
        plain = " ".join(unicodedata.normalize("NFKC", text).lower().split())  # the parser reads ASCII: "Ｌｅｆｔ"
        zones = report_zones(plain)
        template = REPORT_TEMPLATES[self.template]
        if zones is not None and template.pattern.fullmatch(plain):
            return text  # already in the template: its "infected areas" count may say more than the zones
        if zones is not None:
            self.rewritten += 1
            return template.write(zones)
        self.unparsed_count += 1
        action = "used without a report (the image-only path)" if self.unparsed == "drop" else "kept as written"
        mode = warning_mode(self.unparsed_count, self.named_unparsed)
        if mode == "name":
            logger.warning("the report of %s names no lung zone, so it cannot be written as a %s report; %s: %r "
                           "(a network trained on reports of another kind: report_template none)",
                           source, self.template, action, text[:200])
        elif mode == "count":
            logger.warning("%d reports so far name no lung zone and were %s; after the first %d they are counted, "
                           "not named", self.unparsed_count, action, self.named_unparsed)
        return "" if self.unparsed == "drop" else text


class ReportToTemplated(MapTransform):
    """Dictionary wrapper of :class:`ReportToTemplate`: rewrites the report and its ``_ids``/``_mask`` tokens, and
    keeps the text as found in ``<key>_as_written`` (the outputs show both: ``scripts.outputs``).

    Place it after :class:`TokenizeReportd`, which checks that the data carries its reports; a report dropped here
    (one that names no lung zone, ``unparsed="drop"``) becomes "no report" as :class:`RandDropReportd` makes it,
    all-padding ids and an all-zero mask. A missing or empty report passes unchanged.

    Args:
        keys: the report text key(s).
        converter: the converter (``@report_to_template`` in the configs, which the inferer shares). None:
            ``ReportToTemplate()``.
        tokenizer: the tokenizer given to :class:`TokenizeReportd` (``@tokenizer``); None: ``TokenizeReport()``.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        converter: ReportToTemplate | None = None,
        tokenizer: TokenizeReport | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.converter = converter if converter is not None else ReportToTemplate()
        self.tokenize = tokenizer if tokenizer is not None else TokenizeReport()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            text = d[key]
            if not isinstance(text, str):
                continue
            d[f"{key}_as_written"] = text  # every sample of a batch has it, so that they collate
            if not text.strip():
                continue
            new = self.converter(text, f"sample {sample_name(d)}")
            if new != text:
                d[key] = new
                d[f"{key}_ids"], d[f"{key}_mask"] = self.tokenize(new)
        return d


class RandDropReportd(RandomizableTransform, MapTransform):
    """Report dropout: with probability ``prob`` the sample becomes report-free (text ``""``, all-zero mask).

    Trains the networks' "no report" path, which image-only inference (MONAI Label, PACS exports without
    reports) relies on. Place it after :class:`TokenizeReportd` (whose output is cached) among the random
    transforms.

    Args:
        keys: the report text key(s) given to :class:`TokenizeReportd`.
        prob: probability of dropping the report of a sample.
        ids_suffix, mask_suffix: as in :class:`TokenizeReportd`.
        pad_id: token id written over the dropped ids.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        prob: float = 0.1,
        ids_suffix: str = "_ids",
        mask_suffix: str = "_mask",
        pad_id: int = 0,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.ids_suffix, self.mask_suffix, self.pad_id = ids_suffix, mask_suffix, pad_id

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = ""
            d[f"{key}{self.ids_suffix}"] = torch.full_like(torch.as_tensor(d[f"{key}{self.ids_suffix}"]), self.pad_id)
            d[f"{key}{self.mask_suffix}"] = torch.zeros_like(torch.as_tensor(d[f"{key}{self.mask_suffix}"]))
        return d


_SIDES = {"left": "right", "right": "left", "lt": "rt", "rt": "lt", "leftward": "rightward", "rightward": "leftward"}
_SIDE_RE = re.compile(r"\b(" + "|".join(_SIDES) + r")\b", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """``text`` with "left" and "right" (and "lt"/"rt", "leftward"/"rightward") exchanged, case kept."""

    def swap(m: re.Match) -> str:
        word, other = m.group(0), _SIDES[m.group(0).lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDE_RE.sub(swap, text)


class RandSideFlipd(RandomizableTransform, MapTransform):
    """Side-aware horizontal flip: flips image and mask left↔right and swaps the sides named in the report.

    A plain flip (as LViT and RecLMIS train with) turns "left lower lung" into a lie. The report is re-tokenised
    after the swap, with the tokenizer :class:`TokenizeReportd` used (it caches each distinct text, so this is
    cheap).

    Args:
        keys: image and mask keys to flip.
        report_key: the report text key; its ``_ids``/``_mask`` tokens are rewritten.
        prob: flip probability.
        spatial_axis: the image's left–right axis. 0 for images read by MONAI's readers (the first spatial axis
            is the column, x), which is every format this bundle loads.
        tokenizer: the tokenizer given to :class:`TokenizeReportd` (``@tokenizer`` in the configs); None:
            ``TokenizeReport()``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        report_key: str = "report",
        prob: float = 0.5,
        spatial_axis: int = 0,
        tokenizer: TokenizeReport | None = None,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=spatial_axis, allow_missing_keys=True)
        self.report_key = report_key
        self.tokenize = tokenizer if tokenizer is not None else TokenizeReport()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        d = dict(self.flip(d))
        text = d.get(self.report_key)
        if isinstance(text, str) and text.strip():
            # swapped in the form it is tokenised in: NFKC turns a full-width "Ｌｅｆｔ" into "left", which the swap
            # must see too
            d[self.report_key] = swap_sides(self.tokenize.normalise(text))
            ids, mask = self.tokenize(d[self.report_key])
            d[f"{self.report_key}_ids"], d[f"{self.report_key}_mask"] = ids, mask
        return d


class RandRephraseReportd(RandomizableTransform, MapTransform):
    """Report augmentation: with probability ``prob`` the report is rewritten as clinical free text naming the same
    lung zones (:func:`scripts.phrasing.clinical_phrasing`), and re-tokenised with the tokenizer of
    :class:`TokenizeReportd`.

    Templated reports teach the wording of the template; the rewriting teaches what the words mean. Left and right
    keep their meaning in the source report. A report that names no zone (or is missing) is left as it is; a
    phrasing longer than the tokenizer's ``max_length`` is drawn again (``max_tries``), then the report is left
    as it is, so that no phrasing is cut. Place it among the random transforms, before :class:`RandSideFlipd`,
    :class:`RandDropReportd` and ``ReportZonesd`` (which reads the rewritten text).

    Args:
        keys: the report text key(s); their ``_ids``/``_mask`` keys are rewritten.
        prob: probability of rewriting a sample's report.
        tokenizer: the tokenizer given to :class:`TokenizeReportd` (``@tokenizer``); None: ``TokenizeReport()``.
        clear_side_prob: probability of a sentence about the clear side of a unilateral report.
        max_tries: phrasings drawn before giving up on one that fits.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        prob: float = 0.5,
        tokenizer: TokenizeReport | None = None,
        clear_side_prob: float = 0.5,
        max_tries: int = 4,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob)
        self.tokenize = tokenizer if tokenizer is not None else TokenizeReport()
        self.clear_side_prob = float(clear_side_prob)
        self.max_tries = int(max_tries)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            text = d[key]
            zones = report_zones(text) if isinstance(text, str) else None
            if zones is None:
                continue
            for _ in range(self.max_tries):
                new = clinical_phrasing(zones, self.R, self.clear_side_prob)
                if self.tokenize.token_count(new) <= self.tokenize.max_length:
                    d[key] = new
                    d[f"{key}_ids"], d[f"{key}_mask"] = self.tokenize(new)
                    break
        return d
