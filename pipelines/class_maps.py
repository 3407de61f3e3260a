"""What labeled shard sets say of their class ids, and the refusal of sets whose ids mean
different classes (the probe's train and val sets)."""

from __future__ import annotations

import json

from beit_common import BeitDataError

__all__ = ["ClassMaps", "check_class_maps", "merged"]


class ClassMaps:
    """What a set's samples say of their class ids: the class maps they were written with
    (``class_map`` in their ``.json``) and the name of each id."""

    def __init__(self, spec: str):
        self.spec, self.maps, self.names = spec, set(), {}

    def add(self, sample, label: int) -> None:
        raw = sample.members.get("json")
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            return
        if not isinstance(meta, dict):
            return
        if meta.get("class_map"):
            self.maps.add(meta["class_map"])
        if isinstance(meta.get("class"), str):
            self.names.setdefault(label, meta["class"])


def check_class_maps(train: ClassMaps, val: ClassMaps) -> None:
    """Refuse labeled sets whose class ids mean different classes.

    Raises:
        BeitDataError: When the sets were written with different class maps, or an id names
            another class in each.
    """
    hint = "; write both with one class map (beit-data shards VAL --classes TRAIN/shards.json)"
    for found in (train, val):
        if len(found.maps) > 1:
            raise BeitDataError(f"the shards {found.spec} were written with {len(found.maps)} class maps{hint}")
    if train.maps and val.maps and train.maps != val.maps:
        raise BeitDataError(f"the train shards ({train.spec}) and the val shards ({val.spec}) were written with "
                            f"different class maps ({min(train.maps)} and {min(val.maps)}){hint}")
    for label in sorted(set(train.names) & set(val.names)):
        if train.names[label] != val.names[label]:
            raise BeitDataError(f"class {label} is {train.names[label]!r} in the train shards and "
                                f"{val.names[label]!r} in the val shards{hint}")


def merged(parts: list[ClassMaps]) -> ClassMaps:
    """One set's class maps from the ranks that each read a part of it."""
    whole = ClassMaps(parts[0].spec)
    for part in parts:
        whole.maps.update(part.maps)
        whole.names.update(part.names)
    return whole
