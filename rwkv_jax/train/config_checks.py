"""The collector of a config's problems. Each config section's module checks its own section with it
(`check_section(checks)`: model_config.py, data_config.py, optim.py, train_config.py), and
train_config.validate raises them all as one line."""

import math


class ConfigError(ValueError):
    """A config value that cannot work; the message names every such field and the fix."""


class Checks:
    """Problems found in `config` (an ml_collections.ConfigDict), each one line naming the field and the fix."""

    def __init__(self, config):
        self.config = config
        self.problems: list[str] = []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def _number(self, section: str, field: str):
        value = self.config[section][field]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return value, ok

    def at_least(self, section: str, field: str, low, hint: str = "") -> None:
        value, ok = self._number(section, field)
        self.need(ok and value >= low, f"{section}.{field} must be >= {low}, got {value!r}{hint}")

    def positive(self, section: str, field: str, hint: str = "") -> None:
        value, ok = self._number(section, field)
        self.need(ok and value > 0, f"{section}.{field} must be > 0, got {value!r}{hint}")

    def one_of(self, section: str, field: str, choices) -> None:
        value = self.config[section][field]
        self.need(value in choices, f"{section}.{field} must be one of {list(choices)}, got {value!r}")

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError("config: " + "; ".join(self.problems))
