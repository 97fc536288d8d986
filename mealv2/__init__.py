"""mealv2: two-stage MEAL V2 distillation (label once with a teacher ensemble, train many students)."""
__version__ = "0.1.0"
