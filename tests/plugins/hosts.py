"""Shared pytest fixtures: fixture host trees and real-host guards (filled in by the foundation)."""
