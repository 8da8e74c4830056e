"""The stages of a turn, each a function over (Deps, TurnState) yielding events."""
