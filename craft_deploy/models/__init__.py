"""Models: a timm model by name, a local checkpoint, or the bundled pretrained default; model bundles."""

from craft_deploy.models.bundle import BUNDLE_SCHEMA, Bundle, load_bundle, save_bundle
from craft_deploy.models.factory import DEFAULT_MODEL, data_config, load_model

__all__ = ["BUNDLE_SCHEMA", "DEFAULT_MODEL", "Bundle", "data_config", "load_bundle", "load_model", "save_bundle"]
