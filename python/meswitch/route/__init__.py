"""The model-level router: which expert should answer a query.

Hashed n-gram features and a linear classifier, both in C++ (``include/meswitch/router.hpp``);
this package trains routers (scikit-learn), evaluates them and wraps the C++ router for Python.
"""

from __future__ import annotations

from meswitch.route.router import Router, RouteResult, default_router_dir, query_text

__all__ = ["RouteResult", "Router", "default_router_dir", "query_text"]
