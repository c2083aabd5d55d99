"""Real-browser tests of the dashboard (headless Chromium driven by Playwright)."""
