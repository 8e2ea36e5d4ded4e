"""Learner, callbacks, schedules, models, LSUV and the generic stateful optimizer."""
