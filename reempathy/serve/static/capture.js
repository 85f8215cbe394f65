// AudioWorklet processor: hands the microphone's mono samples to the page in blocks of 2400 (0.1 s at 24 kHz).
class PcmCapture extends AudioWorkletProcessor {
  constructor() { super(); this.block = new Float32Array(2400); this.n = 0; }
  process(inputs) {
    const input = inputs[0];
    if (input && input[0]) {
      const ch = input[0];
      for (let i = 0; i < ch.length; i++) {
        this.block[this.n++] = ch[i];
        if (this.n === this.block.length) { this.port.postMessage(this.block.slice(0)); this.n = 0; }
      }
    }
    return true;
  }
}
registerProcessor("pcm-capture", PcmCapture);
