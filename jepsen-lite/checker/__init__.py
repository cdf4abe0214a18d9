"""The linearizability checker: models and the WGL search. Pure, no I/O."""

from jepsen_lite.checker.models import (
    ILLEGAL,
    MODELS,
    CasRegisterModel,
    KvModel,
    Model,
    MultiRegisterModel,
    RegisterModel,
    Role,
    UnsupportedOperation,
    infer_model_name,
    make_model,
    model_for,
)
from jepsen_lite.checker.wgl import CheckResult, Counterexample, Verdict, check

__all__ = [
    "ILLEGAL",
    "MODELS",
    "CasRegisterModel",
    "CheckResult",
    "Counterexample",
    "KvModel",
    "Model",
    "MultiRegisterModel",
    "RegisterModel",
    "Role",
    "UnsupportedOperation",
    "Verdict",
    "check",
    "infer_model_name",
    "make_model",
    "model_for",
]
