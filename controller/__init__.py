"""The live closed-loop controller: a Faust app around a pure batch engine (``controller.engine``).

Importing ``controller`` does not import Faust; ``controller.app`` does.
"""
