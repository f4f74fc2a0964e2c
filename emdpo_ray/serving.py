"""Public import path of the Serve application (`import_path: emdpo_ray.serving:app_builder`
in RayService manifests and Serve configs). The code lives in `emdpo_ray/serve/`."""

from emdpo_ray.serve.api import API_KEY_ENV
from emdpo_ray.serve.app import AppArgs, app_builder, serve_config, start

__all__ = ["API_KEY_ENV", "AppArgs", "app_builder", "serve_config", "start"]
