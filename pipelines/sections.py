"""Configs in sections: each setting has one name across them, so that the command line, a run's
``config.json`` and its checkpoint speak of settings by one flat name, while the stages take
their section whole."""

from __future__ import annotations

from dataclasses import asdict, fields

from beit_common import BeitDataError

__all__ = ["Sectioned", "default", "owners", "setting_names", "INVOCATION", "settings_yaml"]

# What a run never takes from a record of settings: where it is, and what one invocation does.
INVOCATION = ("out", "resume", "extend", "overwrite", "stop_after", "progress")


def default(config: type, name: str):
    """The default of setting ``name`` of a config class (in whichever section holds it), for the
    command line."""
    owner = owners(config).get(name) if issubclass(config, Sectioned) else None
    return (config.SECTION_TYPES[owner] if owner else config).__dataclass_fields__[name].default


def setting_names(config: type) -> set[str]:
    return {f.name for f in fields(config)}


def owners(config: type) -> dict[str, str | None]:
    """Each flat setting of a sectioned config and the section that holds it (None: the config's own)."""
    found: dict[str, str | None] = {name: None for name in setting_names(config) - set(config.SECTION_TYPES)}
    for section, kind in config.SECTION_TYPES.items():
        found.update({name: section for name in setting_names(kind)})
    return found


class Sectioned:
    """A config whose settings sit in sections (``SECTION_TYPES``: name -> dataclass), each setting
    with one name across them: the command line and the checkpoint use the flat names."""

    SECTION_TYPES: dict[str, type] = {}

    @classmethod
    def from_flat(cls, **settings):
        """The config of flat ``settings``: each goes to the section that has it.

        Raises:
            BeitDataError: For a name no section has.
        """
        found = owners(cls)
        parts: dict[str, dict] = {name: {} for name in cls.SECTION_TYPES}
        top = {}
        for name, value in settings.items():
            if name not in found:
                raise BeitDataError(f"{cls.__name__} has no setting `{name}`")
            (top if found[name] is None else parts[found[name]])[name] = value
        return cls(**top, **{name: cls.SECTION_TYPES[name](**values) for name, values in parts.items()})

    def flat(self) -> dict:
        """Every setting by its one name: what a run's ``config.json`` and checkpoint record."""
        out = {name: getattr(self, name) for name, owner in owners(type(self)).items() if owner is None}
        for name in self.SECTION_TYPES:
            out.update(asdict(getattr(self, name)))
        return out

    def setting(self, name: str):
        owner = owners(type(self))[name]
        return getattr(self if owner is None else getattr(self, owner), name)

    def with_settings(self, **settings):
        """A copy with some flat settings changed."""
        return type(self).from_flat(**{**self.flat(), **settings})


def settings_yaml(settings: dict) -> str:
    """A run's resolved settings as the YAML that ``--config`` takes back (``config.yaml``): what
    it computes and how, without where it wrote or what one invocation did (``INVOCATION``)."""
    import yaml

    def plain(value):  # a location (or path) as its text, a tuple as a list
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

    return yaml.safe_dump({k: plain(v) for k, v in settings.items() if k not in INVOCATION}, sort_keys=True)

