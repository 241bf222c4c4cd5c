"""The base of every configuration section (unmask.config, unmask.config_objectives, unmask.config_runtime)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
