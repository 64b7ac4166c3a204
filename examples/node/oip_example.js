'use strict';
// Sequences through the Open Inference Protocol (KServe v2 gRPC with Triton's sequence
// parameters) from Node.js: the service loaded from the .proto, several sequences interleaved
// on one ModelStreamInfer stream and pipelined, each answer matched by its request id.
//
//   node oip_example.js --target localhost:50051 [--model NAME] < sequences.json
// stdin: [[step, ...], ...] one list of timesteps per sequence; stdout: one JSON report.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.LSTM_STREAM_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };

function connect(target) {
  const definition = protoLoader.loadSync('lstm_stream/oip/grpc_service.proto', {
    ...LOADER_OPTIONS,
    includeDirs: [PROTO_DIR],
  });
  const { GRPCInferenceService } = grpc.loadPackageDefinition(definition).inference;
  return new GRPCInferenceService(target, grpc.credentials.createInsecure());
}

function inferRequest(model, id, rows, parameters) {
  const values = Float32Array.from(rows.flat());
  return {
    model_name: model,
    id,
    inputs: [{ name: 'INPUT', datatype: 'FP32', shape: [rows.length, rows[0].length] }],
    raw_input_contents: [Buffer.from(values.buffer)],
    parameters,
  };
}

function outputsOf(response) {
  const [tensor] = response.outputs;
  const raw = response.raw_output_contents[0];
  const flat = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
  const width = Number(tensor.shape[tensor.shape.length - 1]);
  const rows = [];
  for (let i = 0; i < flat.length; i += width) rows.push(Array.from(flat.slice(i, i + width)));
  return rows;
}

async function main() {
  const args = process.argv.slice(2);
  const option = (name, fallback) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : fallback;
  };
  const target = option('--target', 'localhost:50051');
  const model = option('--model', '');
  const sequences = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));

  const client = connect(target);
  const stream = client.ModelStreamInfer();
  const outputs = sequences.map(() => []);
  const errors = [];
  const ids = [];
  const done = new Promise((resolve, reject) => {
    stream.on('data', (answer) => {
      const response = answer.infer_response;
      ids.push(response.id);
      if (answer.error_message) {
        errors.push({ id: response.id, message: answer.error_message });
        return;
      }
      const [sequence, step] = response.id.split('/').map(Number);
      outputs[sequence][step] = outputsOf(response)[0];
    });
    stream.on('end', resolve);
    stream.on('error', reject);
  });

  // Every request is written before any answer is read: sequences are independent, and one
  // sequence's requests are applied in the order written.
  const length = Math.max(...sequences.map((s) => s.length));
  for (let t = 0; t < length; t += 1) {
    sequences.forEach((steps, i) => {
      if (t >= steps.length) return;
      const parameters = {
        sequence_id: i % 2 ? { int64_param: 1000 + i } : { string_param: `node-${i}` },
        sequence_start: { bool_param: t === 0 },
        sequence_end: { bool_param: t === steps.length - 1 },
      };
      stream.write(inferRequest(model, `${i}/${t}`, [steps[t]], parameters));
    });
    if (t === 1) {
      // Not input_size numbers: answered with an error_message, and the stream goes on.
      stream.write(inferRequest(model, 'bad', [[1, 2, 3]], { sequence_id: { string_param: 'node-0' } }));
    }
  }
  stream.end();
  await done;
  client.close();
  console.log(JSON.stringify({ outputs, errors, ids }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
