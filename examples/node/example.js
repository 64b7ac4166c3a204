'use strict';
// Streams timesteps to lstm-serve from Node.js, the way an app would:
//   node example.js --target localhost:50051 < steps.json     (steps.json: [[6 numbers], ...])
//   (--model NAME --model-version N: a session on that model; default: the server's default)
// It opens a session, sends one timestep per message, loses its connection halfway and
// carries on exactly once, resends two answered steps with their start_step (answered from
// the server's replay buffer), shows the ErrorInfo of a refused message, and ends the session.
// Prints one JSON object: the session id, one output row per timestep, and what it saw.

const { connect, Session } = require('./lstm_stream');

async function main() {
  const args = process.argv.slice(2);
  const option = (name, fallback) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
  const target = option('--target', process.env.LSTM_CLIENT_TARGET || 'localhost:50051');
  const steps = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));

  const connection = connect(target, { token: option('--token', process.env.LSTM_CLIENT_TOKEN) });
  const model = { model: option('--model', ''), modelVersion: Number(option('--model-version', 0)) };
  const info = await connection.unary('GetModelInfo', { model: model.model, model_version: model.modelVersion });
  const session = new Session(connection, info, '', 0, model); // its first message creates the session

  const outputs = [];
  for (const [t, step] of steps.entries()) {
    if (t === Math.floor(steps.length / 2)) session.dropAfterNextWrite();
    outputs.push(...(await session.send([step])));
  }

  // A client that is unsure what arrived resends from an earlier step: nothing is applied twice.
  const from = session.nextStep - 2;
  const replayed = await session.send(steps.slice(from), { startStep: from });

  let refusal = null;
  try {
    await session.send([[1, 2, 3]]); // not input_size numbers
  } catch (err) {
    refusal = { code: err.code, reason: err.reason, details: err.details };
  }

  const nextStep = session.nextStep;
  await session.send([], { endSession: true });
  connection.close();
  console.log(
    JSON.stringify({ session_id: session.sessionId, next_step: nextStep, outputs, replayed, resends: session.resends, refusal }),
  );
}

main().catch((err) => {
  console.error(`example.js: ${err.code !== undefined ? `code ${err.code}: ` : ''}${err.details || err.message}`);
  process.exit(1);
});
