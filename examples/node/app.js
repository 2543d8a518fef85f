// The session-gateway example app in Node, with the plain `http` module.
//
// The gateway in front of this app keeps the session. It sends the session
// data as JSON in the X-Session request header ({} for a new visitor), and
// the app changes it with response headers:
//
//   X-Session-Patch: {...}          merge into the session (RFC 7396; null deletes a key)
//   X-Session-Action: regenerate    new session id, same data (on login)
//   X-Session-Action: destroy       delete the session, expire the cookie (on logout)
'use strict';
const http = require('http');

// JSON with every non-ASCII character \u-escaped: JSON.stringify leaves
// them raw, and Node refuses (or mangles) them in a header value.
function asciiJSON(value) {
  return JSON.stringify(value).replace(/[\u007f-\uffff]/g,
    (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

function handle(req, res) {
  // The session data the gateway sent with this request.
  const s = JSON.parse(req.headers['x-session'] || '{}');
  const url = new URL(req.url, 'http://app');
  const q = url.searchParams;
  let status = 200;
  let body;
  switch (`${req.method} ${url.pathname}`) {
    case 'GET /': {
      const visits = (s.visits || 0) + 1;
      res.setHeader('X-Session-Patch', asciiJSON({ visits }));
      body = { visits, user: s.user ?? null };
      break;
    }
    case 'GET /login': case 'POST /login': {
      const user = q.get('user');
      if (!user) {
        [status, body] = [400, { error: 'user required' }];
        break;
      }
      res.setHeader('X-Session-Patch', asciiJSON({ user }));
      // A new session id on login, so an id planted before it is worthless.
      res.setHeader('X-Session-Action', 'regenerate');
      body = { user };
      break;
    }
    case 'GET /logout': case 'POST /logout':
      res.setHeader('X-Session-Action', 'destroy');
      body = { logged_out: true };
      break;
    case 'GET /cart/add': case 'POST /cart/add': {
      const item = q.get('item');
      if (!item) {
        [status, body] = [400, { error: 'item required' }];
        break;
      }
      const cart = s.cart || {};
      const count = (Object.hasOwn(cart, item) ? cart[item] : 0) + 1;
      // The patch names only this item: the gateway merges it into the stored
      // cart, so requests adding other items at the same time are not lost.
      res.setHeader('X-Session-Patch', asciiJSON({ cart: { [item]: count } }));
      body = { ...cart, [item]: count }; // a literal key, even for "__proto__"
      break;
    }
    case 'GET /cart':
      body = s.cart || {};
      break;
    default:
      [status, body] = [404, { error: 'not found' }];
  }
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8' });
  res.end(JSON.stringify(body));
}

const port = Number(process.env.PORT || 8000);
http.createServer(handle).listen(port, process.env.HOST || '127.0.0.1');
