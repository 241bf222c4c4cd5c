"""`unmask plot`: the command only; the drawing is unmask/eval/curves.py."""
