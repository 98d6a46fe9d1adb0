"""Access policies and provenance: who may use which security domain's experts and artefacts.

A policy file (YAML or JSON) maps principals to the private domains they may read; the public
domain is readable by everyone and need not be listed::

    public: public          # optional; must match the trained model's public domain
    principals:
      alice: [legal]
      bob: [legal, code]
      guest: []             # public experts only

Every artefact of an IFC run records its *provenance*, the domains whose data touched it (the
tokenizer, the shared parameters, each expert). :meth:`AccessPolicy.check` refuses an artefact
whose provenance is not inside the principal's domains plus public. Everything fails closed: an
empty policy, an unknown principal, or a domain the model has no expert for is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from moe_lab.config.load import yaml_error

__all__ = ["AccessPolicy", "PolicyError"]


class PolicyError(PermissionError):
    """An access-policy violation or an unusable policy: nothing runs."""


@dataclass(frozen=True)
class AccessPolicy:
    grants: dict[str, frozenset[str]]  # principal -> private domains it may read
    public: str | None = None  # the public domain the file was written for, if it says

    @classmethod
    def from_dict(cls, raw: object, source: str = "policy") -> AccessPolicy:
        if not isinstance(raw, dict) or not isinstance(raw.get("principals"), dict):
            raise PolicyError(f"{source}: expected a mapping with a 'principals' mapping")
        if not raw["principals"]:
            raise PolicyError(f"{source}: no principals: an empty policy grants nothing")
        grants = {}
        for principal, domains in raw["principals"].items():
            if domains is None:
                domains = []
            if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
                raise PolicyError(f"{source}: principal {principal!r} needs a list of domains")
            grants[str(principal)] = frozenset(domains)
        unknown = set(raw) - {"public", "principals"}
        if unknown:
            raise PolicyError(f"{source}: unknown keys {sorted(unknown)}")
        return cls(grants, raw.get("public"))

    @classmethod
    def load(cls, path: str | Path) -> AccessPolicy:
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"access policy {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PolicyError(f"access policy {yaml_error(path, e)}") from None
        return cls.from_dict(raw, str(path))

    def permitted(self, principal: str, public: str, domains: Iterable[str]) -> list[str]:
        """The domains ``principal`` may use: ``public`` first, then its grants in model order.

        Args:
            public: the model's public domain.
            domains: the model's private domains (those with an expert).

        Raises:
            PolicyError: unknown principal, a policy for another public domain, or a granted
                domain the model has no expert for.
        """
        if self.public is not None and self.public != public:
            raise PolicyError(f"the policy is for public domain {self.public!r}, not {public!r}")
        if principal not in self.grants:
            raise PolicyError(
                f"unknown principal {principal!r}; the policy knows {sorted(self.grants)}"
            )
        domains = list(domains)
        missing = sorted(self.grants[principal] - set(domains) - {public})
        if missing:
            raise PolicyError(
                f"principal {principal!r} is granted {missing}, which have no expert "
                f"(the model has {domains})"
            )
        return [public] + [d for d in domains if d in self.grants[principal]]

    @staticmethod
    def check(artefact: str, provenance: Iterable[str], permitted: Iterable[str]) -> None:
        """Refuse ``artefact`` unless every domain of its provenance is permitted."""
        outside = sorted(set(provenance) - set(permitted))
        if outside:
            raise PolicyError(
                f"{artefact} was built from data of {outside}, which the principal may not read"
            )
