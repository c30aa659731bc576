'use strict';
// The Socket.IO tutorial's chat server after its step #8 ("Client delivery"),
// written from socket.io/docs/v4/tutorial (steps 6-8), as the peer that
// tabrelay is benchmarked against (issue #6). Deliberately kept as the tutorial
// has it: one process, one room (everybody gets everything), connection state
// recovery with its defaults, every message an INSERT into SQLite with the
// library defaults, live messages broadcast with io.emit(msg, rowid), and a
// replay of `id > auth.serverOffset` on every connection that was not
// recovered. What differs from the tutorial is only the plumbing around it:
//   - a plain node:http server instead of express (express only served
//     index.html; no page is served here);
//   - the database file and the port come from the command line / environment
//     instead of 'chat.db' and 3000, and it listens on 127.0.0.1 only;
//   - it prints one "listening" line with the real port and closes cleanly on
//     SIGTERM/SIGINT so that a benchmark can start and stop it.
// Step #9 (cluster + @socket.io/cluster-adapter, one worker per core, each on
// its own port) is not reproduced: see README.md.
//
// Usage: node server.js [--port N] [--db PATH] [--host 127.0.0.1]
//   env:  PORT, CHAT_DB (default ./chat.db), HOST

const { createServer } = require('node:http');
const { Server } = require('socket.io');
const sqlite3 = require('sqlite3');
const { open } = require('sqlite');

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(a);
    if (!m) {
      throw new Error(`unexpected argument: ${a}`);
    }
    out[m[1]] = m[2] !== undefined ? m[2] : argv[++i];
  }
  return out;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const port = Number(args.port ?? process.env.PORT ?? 3000);
  const host = args.host ?? process.env.HOST ?? '127.0.0.1';
  const filename = args.db ?? process.env.CHAT_DB ?? 'chat.db';
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`bad port: ${args.port ?? process.env.PORT}`);
  }

  // open the database file (tutorial step #7)
  const db = await open({
    filename,
    driver: sqlite3.Database,
  });

  // create the 'messages' table (tutorial step #7; client_offset is used in step #8)
  await db.exec(`
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        client_offset TEXT UNIQUE,
        content TEXT
    );
  `);

  const server = createServer((req, res) => {
    // Socket.IO answers its own path (/socket.io/); anything else is a health check.
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end('socket.io tutorial chat peer\n');
  });
  const io = new Server(server, {
    connectionStateRecovery: {}, // tutorial step #6
  });

  io.on('connection', async (socket) => {
    // tutorial step #8: store once (UNIQUE client_offset), broadcast with the row id, ack
    socket.on('chat message', async (msg, clientOffset, callback) => {
      let result;
      try {
        result = await db.run(
          'INSERT INTO messages (content, client_offset) VALUES (?, ?)',
          msg,
          clientOffset,
        );
      } catch (e) {
        if (e.errno === 19 /* SQLITE_CONSTRAINT */) {
          // the message was already inserted, so we notify the client
          if (typeof callback === 'function') callback();
        } else {
          // nothing to do, just let the client retry
        }
        return;
      }
      io.emit('chat message', msg, result.lastID);
      // acknowledge the event
      if (typeof callback === 'function') callback();
    });

    // tutorial step #7: send the missing messages when the state was not recovered
    if (!socket.recovered) {
      try {
        await db.each(
          'SELECT id, content FROM messages WHERE id > ?',
          [socket.handshake.auth.serverOffset || 0],
          (_err, row) => {
            socket.emit('chat message', row.content, row.id);
          },
        );
      } catch (e) {
        // something went wrong
      }
    }
  });

  let closing = false;
  const shutdown = (signal) => {
    if (closing) return;
    closing = true;
    // io.close() disconnects every client and closes the http server
    io.close(() => {
      db.close().then(
        () => process.exit(0),
        () => process.exit(0),
      );
    });
    // never hang a benchmark on a stuck close
    setTimeout(() => process.exit(0), 3000).unref();
    process.stderr.write(`received ${signal}, closing\n`);
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  server.listen(port, host, () => {
    const addr = server.address();
    console.log(`listening on http://${addr.address}:${addr.port} db=${filename} pid=${process.pid}`);
  });
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
