"""The session-gateway example app in Flask, with no session library.

The gateway in front of this app keeps the session. It sends the session
data as JSON in the X-Session request header ({} for a new visitor), and
the app changes it with response headers:

  X-Session-Patch: {...}          merge into the session (RFC 7396; null deletes a key)
  X-Session-Action: regenerate    new session id, same data (on login)
  X-Session-Action: destroy       delete the session, expire the cookie (on logout)
"""
import json
import os

from flask import Flask, jsonify, request

app = Flask(__name__)


def session():
    """The session data the gateway sent with this request."""
    return json.loads(request.headers.get("X-Session", "{}"))


def patch(response, data):
    """Ask the gateway to merge `data` into the session. json.dumps escapes
    non-ASCII characters (ensure_ascii), so the header value stays ASCII."""
    response.headers["X-Session-Patch"] = json.dumps(data)
    return response


@app.get("/")
def visits():
    s = session()
    visits = s.get("visits", 0) + 1
    return patch(jsonify(visits=visits, user=s.get("user")), {"visits": visits})


@app.route("/login", methods=["GET", "POST"])
def login():
    user = request.args.get("user")
    if not user:
        return jsonify(error="user required"), 400
    response = patch(jsonify(user=user), {"user": user})
    # A new session id on login, so an id planted before it is worthless.
    response.headers["X-Session-Action"] = "regenerate"
    return response


@app.route("/logout", methods=["GET", "POST"])
def logout():
    response = jsonify(logged_out=True)
    response.headers["X-Session-Action"] = "destroy"
    return response


@app.route("/cart/add", methods=["GET", "POST"])
def cart_add():
    item = request.args.get("item")
    if not item:
        return jsonify(error="item required"), 400
    cart = session().get("cart", {})
    cart[item] = cart.get(item, 0) + 1
    # The patch names only this item: the gateway merges it into the stored
    # cart, so requests adding other items at the same time are not lost.
    return patch(jsonify(cart), {"cart": {item: cart[item]}})


@app.get("/cart")
def cart():
    return jsonify(session().get("cart", {}))


if __name__ == "__main__":
    host = os.environ.get("HOST", "127.0.0.1")
    app.run(host=host, port=int(os.environ.get("PORT", "8000")))
