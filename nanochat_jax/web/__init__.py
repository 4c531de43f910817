"""The chat web app: Flask server (app.py) and its single static page (static/index.html)."""
